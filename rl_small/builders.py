"""Objects a run builds from its config before training: reward components, the LR schedule, seeds.

    rewards = build_rewards(cfg); scheduler = make_scheduler(optimizer, cfg); seed_everything(cfg.train.seed)
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from rewards import CombinedReward, RewardComponent, build_reward
from rl_small.config import RecipeError, RunConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_rewards(cfg: RunConfig) -> CombinedReward:
    """Instantiate the recipe's reward components (each with its own parameters, weight and deadline)."""
    comps = []
    for i, spec in enumerate(cfg.rewards):
        try:
            fn = build_reward(spec.name, spec.params)
        except (KeyError, TypeError, AttributeError, ImportError, FileNotFoundError, ValueError) as err:
            raise RecipeError(f"rewards[{i}] ({spec.name!r}): {err}") from err
        comps.append(RewardComponent(spec.name, fn, spec.weight, spec.timeout_s, spec.conversational, spec.columns))
    return CombinedReward(comps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    o, total = cfg.optim, max(cfg.train.steps, 1)

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        frac = (step - o.warmup_steps) / max(total - o.warmup_steps, 1)
        if o.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        if o.schedule == "linear":
            return max(1.0 - frac, 0.0)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
