"""rl-small's reward library (installed as the top-level package ``rewards``).

Importing it registers the built-in rewards: ``math_accuracy``, ``boxed_format``, ``think_answer_format``,
``soft_overlong``, ``kimi_length``, ``cosine_length``, ``l1_length``, ``tldr_length``, ``code_execution``,
``episodic_memory``.
A reward follows TRL's contract: ``f(completions: list[str], **kwargs) -> list[float | None]``.
"""

from rewards import code as _code  # noqa: F401  (registers)
from rewards import memory as _memory  # noqa: F401  (registers)
from rewards import format as _format  # noqa: F401  (registers)
from rewards import length as _length  # noqa: F401  (registers)
from rewards import math as _math  # noqa: F401  (registers)
from rewards.base import (
    REWARD_REGISTRY,
    CombinedReward,
    RewardComponent,
    RewardConfigError,
    RewardError,
    RewardTimeout,
    build_reward,
    deadline,
    register_reward,
)

__all__ = [
    "REWARD_REGISTRY",
    "CombinedReward",
    "RewardComponent",
    "RewardConfigError",
    "RewardError",
    "RewardTimeout",
    "build_reward",
    "deadline",
    "register_reward",
]
