"""Reward functions used by the tests through the dotted-path plugin mechanism."""

from __future__ import annotations

import time
from typing import Any


def token_reward(completions: list[str], completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
    """A dense, tie-free signal for a random model: differs for (almost) any two different completions."""
    return [(sum(ids) % 97) / 97 - 1.0 / (1 + len(ids)) for ids in completion_ids]


def hang(completions: list[str], **kwargs: Any) -> list[float]:
    time.sleep(60)
    return [0.0] * len(completions)
