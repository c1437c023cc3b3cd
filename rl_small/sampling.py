"""Batch-level sampling (docs/METHODS.md §3): which prompts and groups a training step uses.

    groups, m = dynamic_sample(draw, target=4, max_extra_rounds=3)   # DAPO: drop all-pass/all-fail groups
    keep = overlong_keep(truncated)                                  # DAPO overlong filtering: (N,) 0/1
    tracker = PassRateTracker(); tracker.update(ids, passed); tracker.skip(pid)   # SimpleRL-Zoo difficulty
    w = domain_weights(ewma(prev, batch_means, 0.5), target=1.0, tau=0.8)       # RuleReasoner DADS

``draw(n)`` is any callable that generates and scores ``n`` prompts' groups (``Group``), so the loop is tested without a
model (and across simulated processes). The pass-rate tracker has ``state_dict`` / ``load_state_dict`` and is
saved with checkpoints. The domain weights are applied by rl_small.data.mixture.DomainMixture.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from rl_small import metric_names as M
from rl_small.distributed import World
from rl_small.types import Group


def total_reward(g: Group) -> list[float]:
    """Each rollout's total reward."""
    return list(g.rewards)


def group_signal(f: Any, reward_names: list[str]) -> Callable[[Group], list[float]]:
    """What dynamic sampling compares within a group (``f.dynamic_sampling_on``; ``f``: the group filters'
    options). DAPO (arXiv 2503.14476 eq. 11) keeps a group unless its accuracy is all 0 or all 1: with shaping
    terms in the total reward (format, overlong penalty) an all-wrong group still has unequal totals, so ``pass``
    (and ``auto`` when the pass reward exists) compares 1/0 passes of ``f.pass_reward`` >= ``f.pass_threshold``
    (an abstained score counts as a fail); ``reward`` compares the total reward."""
    on = f.dynamic_sampling_on
    if on == "reward" or (on == "auto" and f.pass_reward not in reward_names):
        return total_reward
    name, threshold = f.pass_reward, f.pass_threshold

    def passed(g: Group) -> list[float]:
        return [float(c is not None and c >= threshold) for c in g.components.get(name, [None] * len(g.rollouts))]

    return passed


def is_informative(group: Group, tol: float = 1e-6, signal: Callable[[Group], list[float]] = total_reward) -> bool:
    """A group teaches something only if its ``signal`` (default: the total reward) differs."""
    values = signal(group)
    return max(values) - min(values) > tol


def dynamic_sample(
    draw: Callable[[int], list[Group]], target: int, max_extra_rounds: int, world: World | None = None,
    signal: Callable[[Group], list[float]] = total_reward,
) -> tuple[list[Group], dict[str, float]]:
    """DAPO dynamic sampling (arXiv 2503.14476 §3.2): keep only groups whose ``signal`` (``group_signal``: passes
    or total reward) is not all equal and draw more prompts until ``target`` groups are kept or
    ``max_extra_rounds`` extra rounds were spent.

    Each extra round asks for the missing groups divided by the keep rate seen so far (at most ``target``).
    Extra kept groups beyond ``target`` are discarded; if no group at all was informative the first round is
    returned as is (a zero-advantage batch) rather than nothing. Metrics: sampling/rounds,
    sampling/dropped_groups, sampling/kept_groups, sampling/batch_fill.

    Data parallel (``world`` of several processes, ``target`` groups each, ``draw(n)`` returning this process's
    slice ``global[rank::size]`` of a global draw of ``n * size`` prompts): the counts are summed over the
    processes, so every process takes the same decisions and draws alike; the kept groups are then pooled in
    global draw order and dealt out ``target`` per process, the batch one process would keep from the same
    draws. If fewer than ``target * size`` were kept, they are dealt round-robin and each process fills up to
    ``target`` groups with copies of groups of its first round at ``weight`` 0 (same shapes everywhere for DDP,
    no effect on the loss); ``sampling/filler_groups`` counts them. The counts in the metrics are global.
    """
    if target < 1 or max_extra_rounds < 0:
        msg = f"dynamic_sample: target must be >= 1 and max_extra_rounds >= 0, got {target}, {max_extra_rounds}"
        raise ValueError(msg)
    world = world or World()
    size, rank = world.size, world.rank
    kept: list[tuple[tuple[int, int], Group]] = []  # (round, index in the global draw), group
    first: list[Group] | None = None
    rounds = 0
    totals = torch.zeros(3, dtype=torch.float64)  # global groups seen, kept, dropped
    n = target
    while True:
        groups = draw(n)
        first = groups if first is None else first
        informative = [is_informative(g, signal=signal) for g in groups]
        kept += [((rounds, i * size + rank), g) for i, (g, ok) in enumerate(zip(groups, informative)) if ok]
        n_kept = sum(informative)
        totals += world.sum(torch.tensor([len(groups), n_kept, len(groups) - n_kept], dtype=torch.float64))
        rounds += 1
        seen_g, kept_g = int(totals[0]), int(totals[1])
        missing = target * size - kept_g
        if missing <= 0 or rounds > max_extra_rounds:
            break
        want = min(target * size, math.ceil(missing * seen_g / kept_g)) if kept_g else target * size
        n = math.ceil(want / size)
    kept_g = int(totals[1])
    fillers: list[Group] = []
    if kept_g == 0:
        batch = first
    elif size == 1:
        batch = [g for _, g in kept[:target]]
    else:
        pooled = [g for _, g in sorted(world.gather(kept), key=lambda kg: kg[0])][: target * size]
        batch = pooled[rank * target : (rank + 1) * target] if len(pooled) == target * size else pooled[rank::size]
        fillers = [dataclasses.replace(g, weight=0.0) for g in first[: target - len(batch)]]
    metrics = {
        M.SAMPLING_ROUNDS: float(rounds),
        M.SAMPLING_DROPPED_GROUPS: float(totals[2]),
        M.SAMPLING_KEPT_GROUPS: float(min(kept_g, target * size)),
        M.SAMPLING_BATCH_FILL: min(kept_g, target * size) / (target * size),
    }
    if size > 1:
        metrics[M.SAMPLING_FILLER_GROUPS] = float(target * size - min(kept_g, target * size)) if kept_g else 0.0
    return batch + fillers, metrics


def merge_round_metrics(rounds: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Combine the reward metrics of several generation rounds of ``n`` rollouts each: counters
    (``reward/<name>/<counter>``, metric_names.REWARD_COUNTERS) and ``timing/*`` add up, everything else is a
    rollout-weighted mean."""
    out: dict[str, float] = {}
    total = sum(n for n, _ in rounds)
    for n, m in rounds:
        for k, v in m.items():
            additive = k.startswith("timing/") or k.endswith(tuple(f"/{c}" for c in M.REWARD_COUNTERS))
            out[k] = out.get(k, 0.0) + (v if additive else v * n / max(total, 1))
    return out


def overlong_keep(truncated: list[bool] | torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering: loss weight (N,) = 0 for completions cut by the length limit, 1 otherwise."""
    t = torch.as_tensor(truncated, dtype=torch.bool)
    return (~t).float()


class PassRateTracker:
    """Running pass rate per prompt id (SimpleRL-Zoo difficulty control, arXiv 2503.18892): a prompt whose
    completions so far were all right or all wrong is skipped when it comes round again."""

    def __init__(self) -> None:
        self.stats: dict[str, list[int]] = {}  # prompt id -> [passed, seen]

    def update(self, prompt_ids: list[str], passed: list[bool | None]) -> None:
        """Count one completion per entry; None (the grader abstained) is not counted."""
        for pid, ok in zip(prompt_ids, passed, strict=True):
            if ok is None:
                continue
            st = self.stats.setdefault(pid, [0, 0])
            st[0] += int(ok)
            st[1] += 1

    def rate(self, prompt_id: str) -> float | None:
        """Pass rate so far, or None for a prompt not seen yet."""
        st = self.stats.get(prompt_id)
        return None if st is None or st[1] == 0 else st[0] / st[1]

    def skip(self, prompt_id: str) -> bool:
        rate = self.rate(prompt_id)
        return rate is not None and rate in (0.0, 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = {k: list(v) for k, v in state["stats"].items()}


def ewma(previous: torch.Tensor | None, current: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Exponential moving average of per-domain mean rewards: alpha * previous + (1 - alpha) * current; (D,)."""
    if not 0 <= alpha < 1:
        raise ValueError(f"ewma alpha must be in [0, 1), got {alpha}")
    return current if previous is None else alpha * previous + (1 - alpha) * current


def domain_weights(mean_rewards: torch.Tensor, target: float = 1.0, tau: float = 0.8) -> torch.Tensor:
    """RuleReasoner domain-aware dynamic sampling (arXiv 2506.08672; defaults from its released config):
    v_d = max(0, target - rbar_d) (how far a domain is from the target reward), w = softmax(v / tau).

    mean_rewards: (D,) historical mean reward per domain (e.g. ``ewma`` of batch means) -> (D,) sampling
    weights summing to 1; a lower reward gets more weight, a smaller ``tau`` sharpens the preference. (The
    released code adds a constant eps inside the exponent; it cancels in the softmax.)
    """
    if tau <= 0:
        raise ValueError(f"domain_weights: tau must be > 0, got {tau}")
    value = (target - mean_rewards).clamp(min=0)
    return torch.softmax(value / tau, dim=0)
