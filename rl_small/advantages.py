"""Advantage estimators: pure tensor functions registered by name.

    adv = ADVANTAGES["grpo"](rewards, group_ids)                     # (N,), (N,) -> (N,)
    adv = ADVANTAGES["reinforce_pp"](rewards, group_ids, mask=m, kl=kl, kl_coef=0.01)   # -> (N, T)
    adv, ret = ADVANTAGES["gae"](values, rewards, mask, gamma=1.0, lam=0.95)            # -> (N, T), (N, T)

The group estimators (grpo, dr_grpo, rloo) return one scalar per completion, broadcast over its tokens by
the loss; a group whose rewards are all equal gets zero advantage: it carries no signal (docs/METHODS.md §1).
reinforce_pp and gae work per token on right-padded (N, T) tensors with a 0/1 ``mask``; padding gets 0.
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


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-8,
    sum_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the ``mask`` entries (population variance), 0 elsewhere; any shape.

    ``sum_fn`` sums a 1-D tensor over the data-parallel processes (rl_small.distributed.World.sum): mean and
    variance are then those of the global batch, as one process holding all of it would compute them.
    """
    total = sum_fn or (lambda t: t)
    m = mask.to(x.dtype)
    n, s = total(torch.stack([m.sum(), (x * m).sum()]))
    n = n.clamp(min=1)
    mean = s / n
    var = total((((x - mean) * m) ** 2).sum().reshape(1))[0] / n
    return (x - mean) * torch.rsqrt(var + eps) * m


@register_advantage("reinforce_pp")
def reinforce_pp_advantage(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    group_baseline: bool = False,
    eps: float = 1e-8,
    sum_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **_: object,
) -> torch.Tensor:
    """REINFORCE++ (arXiv 2501.03262): A_t = r - beta * sum_{s >= t} KL_s, then normalised by the mean and
    std over the *whole global batch* (not per group).

    rewards, group_ids: (N,). Per token (``mask`` (N, T) given): ``kl`` (N, T) is the per-token KL penalty of
    the sampling policy to the reference (k1 in the paper; None = no penalty) and the reward-to-go with
    gamma = 1 is taken over each sequence's own tokens; the mean/std are over all masked tokens and the result
    is (N, T), 0 on padding. Without ``mask``: one scalar per sequence, normalised over the N sequences, (N,).
    ``group_baseline``: subtract the group mean reward first (REINFORCE++-baseline, the paper's variant for
    reasoning tasks with several samples per prompt). ``sum_fn``: see ``masked_whiten`` (data parallelism).
    """
    r = rewards
    if group_baseline:
        r = r - _group_stats(rewards, group_ids)[0]
    if mask is None:
        if kl is not None:
            raise ValueError("reinforce_pp: a per-token kl needs the (N, T) mask")
        return masked_whiten(r, torch.ones_like(r), eps, sum_fn)
    m = mask.to(r.dtype)
    ret = r.unsqueeze(-1).expand_as(m)
    if kl is not None and kl_coef:
        kl_m = kl * m
        to_go = kl_m.flip(-1).cumsum(-1).flip(-1)  # sum_{s >= t} KL_s within each sequence
        ret = ret - kl_coef * to_go
    return masked_whiten(ret, m, eps, sum_fn)


def last_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence rewards (N,) placed on each sequence's last completion token of a right-padded (N, T) mask."""
    m = mask.to(rewards.dtype)
    last = (m.sum(-1).long() - 1).clamp(min=0)
    return torch.zeros_like(m).scatter(1, last.unsqueeze(-1), rewards.unsqueeze(-1)) * m


@register_advantage("gae")
def gae_advantage(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation for PPO (Schulman et al. 2016, arXiv 1506.02438).

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lam)^l delta_{t+l}, returns R_t = A_t + V_t.
    values: (N, T), V_t = value of the state *before* completion token t. rewards: (N,) sequence rewards,
    placed on each sequence's last completion token, or (N, T) per-token rewards (e.g. reward minus a KL
    penalty). mask: (N, T) right-padded 0/1. Bootstrapping stops at each sequence's own end (V after the last
    token is 0) and padding contributes nothing. Returns (advantages (N, T), returns (N, T)), 0 on padding.
    """
    m = mask.to(values.dtype)
    v = torch.where(m.bool(), values, torch.zeros_like(values))
    if rewards.dim() == 1:
        tok_r = last_token_rewards(rewards.to(v.dtype), m)
    else:
        tok_r = torch.where(m.bool(), rewards.to(v.dtype), torch.zeros_like(v))
    n, t_len = v.shape
    adv = torch.zeros_like(v)
    running = torch.zeros(n, dtype=v.dtype)
    for t in reversed(range(t_len)):
        next_m = m[:, t + 1] if t + 1 < t_len else torch.zeros(n, dtype=v.dtype)
        next_v = v[:, t + 1] * next_m if t + 1 < t_len else next_m
        delta = tok_r[:, t] + gamma * next_v - v[:, t]
        running = delta + gamma * lam * next_m * running
        adv[:, t] = running
    adv = adv * m
    return adv, (adv + v) * m
