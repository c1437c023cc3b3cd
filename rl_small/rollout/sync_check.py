"""Sync verification that cannot be silent: alarm when the sampler's log-probs stop matching the trainer's.

    check = SyncCheck.from_config(cfg.rollout)
    m.update(check(m, scored, step_no, world))   # in Trainer.step, after the update measured the difference

A sampler that serves the policy it was told to serve differs from the trainer only by kernel numerics
(about 1e-5 nats per token in fp32, 1e-2 in bf16), or by a known number of versions when rollouts are stale on
purpose (rollout.sync_every > 1, async_generation). Weights that silently failed to reach the sampler (an
adapter load that did not take, a restarted server that lost it, a version name that points at old weights)
make ``rollout/sampler_logp_absdiff`` (mean |log pi_old - log pi_sampler| per token, Trainer._minibatch_step)
jump above that level: the signal that revealed stale weights in TRL and verl runs.

Each rollout records the policy version it was sampled with; the version lag of a batch is the trainer's
version minus the oldest rollout version in it. The check keeps a running median of the difference per lag
(``window`` steps, alarming values left out so that a persistent fault keeps alarming) and reports

    rollout/version_lag         largest lag in the batch; above sync_every - 1 (+1 with async): a warning
    rollout/sampler_logp_jump   difference / running median at that lag (once ``warmup`` values are in)
    rollout/sync_alarm          1 on a step whose jump passed rollout.sync_check_warn

A jump counts only if it also exceeds the median by ``min_delta`` nats (rollout.sync_check_min_delta), so fp32
noise around 1e-5 never alarms. Past rollout.sync_check_error the run stops with ``SyncError``, which names
the step, the values and the usual causes. The history is not checkpointed: after a resume it warms up again.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rl_small.rollout.base import RolloutError

if TYPE_CHECKING:
    from rl_small.config import RolloutConfig

log = logging.getLogger("rl_small.rollout")
METRIC = "rollout/sampler_logp_absdiff"


class SyncError(RolloutError):
    """The sampler's log-probs jumped far from the trainer's: the sampler is not serving the trained policy."""


@dataclass
class SyncCheck:
    """Running baseline of the sampler/trainer difference per version lag, and the alarms."""

    warn: float = 5.0
    error: float | None = 50.0
    min_delta: float = 1e-3
    max_lag: int = 0
    window: int = 50
    warmup: int = 2
    history: dict[int, deque[float]] = field(default_factory=dict)
    alarms: int = 0

    @classmethod
    def from_config(cls, cfg: RolloutConfig) -> SyncCheck:
        return cls(cfg.sync_check_warn, cfg.sync_check_error, cfg.sync_check_min_delta,
                   max_lag=cfg.sync_every - 1 + int(cfg.async_generation))

    def __call__(self, metrics: dict[str, float], rollouts: Sequence[Any], version: int,
                 world: Any = None) -> dict[str, float]:
        """Metrics of one step: ``metrics`` holds this process's ``rollout/sampler_logp_absdiff`` (absent when
        the backend reports no sampler logprobs), ``rollouts`` the step's (scored) rollouts, ``version`` the
        policy version the update started from; ``world`` (rl_small.distributed.World) averages the difference
        over processes so that every process takes the same decision."""
        versions = [getattr(r, "rollout", r).version for r in rollouts]
        lag = max(0, version - min(versions)) if versions else 0
        out = {"rollout/version_lag": float(lag)}
        if lag > self.max_lag:
            log.warning("step %d trained on rollouts %d versions old (expected at most %d): the sampler is not "
                        "given new weights as often as rollout.sync_every says", version + 1, lag, self.max_lag)
        value = _mean_over(world, metrics.get(METRIC))
        if value is None:
            return out
        return out | self.observe(value, lag, version + 1)

    def observe(self, value: float, lag: int = 0, step: int = 0) -> dict[str, float]:
        """Judge one difference at one version lag against the running median; may raise ``SyncError``."""
        hist = self.history.setdefault(lag, deque(maxlen=self.window))
        if len(hist) < self.warmup:
            hist.append(value)
            return {}
        base = statistics.median(hist)
        jump = value / max(base, 1e-9)
        out = {"rollout/sampler_logp_jump": jump, "rollout/sync_alarm": 0.0}
        if value - base <= self.min_delta or jump < self.warn:
            hist.append(value)
            return out
        self.alarms += 1
        out["rollout/sync_alarm"] = 1.0
        what = (f"step {step}: sampler/trainer log-prob difference {value:.3g} nats/token is {jump:.1f}x its running "
                f"median {base:.3g} at version lag {lag}")
        why = ("the sampler is likely not serving the trained weights (adapter load failed or lost on a server "
               "restart, wrong adapter folder, a server outside this run answering on the URL)")
        if self.error is not None and jump >= self.error:
            raise SyncError(f"{what} (rollout.sync_check_error={self.error:g}): {why}")
        log.warning("%s (rollout.sync_check_warn=%g): %s", what, self.warn, why)
        return out


def _mean_over(world: Any, value: float | None) -> float | None:
    """Mean of ``value`` over the processes, or None on every process when any of them lacks it (a rank whose
    batch had a completion with a short sampler logprob list has no sampler_logp). Every process joins the same
    reduction of a (value, present) pair: a rank that returned early would leave the others blocked in it."""
    if world is None or getattr(world, "size", 1) <= 1:
        return value
    import torch

    total, present = world.sum(torch.tensor([value or 0.0, float(value is not None)], dtype=torch.float64)).tolist()
    if present < world.size:
        log.debug("sync check skipped: %d of %d processes have %s", int(present), world.size, METRIC)
        return None
    return total / world.size
