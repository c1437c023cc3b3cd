"""Advantage estimators: pure tensor functions registered by name.

    adv = ADVANTAGES["grpo"](rewards, group_ids)      # rewards: (N,), group_ids: (N,) -> (N,)

Each returns one scalar per completion (broadcast over its tokens by the loss). A group whose rewards are
all equal gets zero advantage: it carries no signal (METHODS.md §1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def wrap(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGES:
            raise ValueError(f"advantage {name!r} is already registered")
        ADVANTAGES[name] = fn
        return fn

    return wrap


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-completion (group mean, group std (unbiased), group size), each shaped (N,)."""
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=rewards.dtype).index_add_(0, inv, rewards)
    mean = (sums / counts)[inv]
    sq = torch.zeros(len(counts), dtype=rewards.dtype).index_add_(0, inv, (rewards - mean) ** 2)
    var = sq / (counts - 1).clamp(min=1)
    return mean, var.sqrt()[inv], counts[inv].to(rewards.dtype)


@register_advantage("grpo")
def grpo_advantage(
    rewards: torch.Tensor, group_ids: torch.Tensor, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO (DeepSeekMath, arXiv 2402.03300): A_i = (r_i - mean_g) / (std_g + eps); (N,) -> (N,)."""
    mean, std, _ = _group_stats(rewards, group_ids)
    adv = rewards - mean
    if not scale:
        return adv
    # A tied group has adv == 0 and std == 0: keep it 0 even with eps = 0 (no 0/0).
    return torch.where(std > 0, adv / (std + eps), torch.zeros_like(adv))


@register_advantage("dr_grpo")
def dr_grpo_advantage(rewards: torch.Tensor, group_ids: torch.Tensor, **_: object) -> torch.Tensor:
    """Dr. GRPO (arXiv 2503.20783): A_i = r_i - mean_g, no std division; (N,) -> (N,)."""
    mean, _, _ = _group_stats(rewards, group_ids)
    return rewards - mean


@register_advantage("rloo")
def rloo_advantage(rewards: torch.Tensor, group_ids: torch.Tensor, **_: object) -> torch.Tensor:
    """RLOO (arXiv 2402.14740): A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_g); (N,) -> (N,)."""
    mean, _, g = _group_stats(rewards, group_ids)
    if bool((g < 2).any()):
        raise ValueError("rloo needs at least 2 completions per group")
    return (rewards - mean) * g / (g - 1)
