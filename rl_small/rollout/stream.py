"""The rollout stream: where a training step's groups come from.

    stream = RolloutStream(cfg, mixture, backend, rewards, world)
    groups = stream.next_groups(step, metrics)    # stages prompts, rollout, reward (timed into metrics)
    state = stream.state_dict(); stream.load_state_dict(state)       # with every checkpoint

It owns the data cursor (rl_small.data.mixture: seeded per-epoch permutations, per domain with data.mix), the
generation through the backend, the scoring (a draw's groups flattened into the TRL-style keyword lists the
rewards take), the group filters of docs/METHODS.md §3 (rl_small.sampling: DAPO dynamic sampling and its refill
rounds, the SimpleRL-Zoo difficulty filter's pass rates, RuleReasoner domain weights) and async prefetch: with
``rollout.async_generation`` the next step's rollouts are generated during this step's update, and a checkpoint
keeps the cursor as it was before that draw, so a resumed run redraws the prompts that were in flight.
"""

from __future__ import annotations

import copy
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from rl_small import metric_names as M
from rl_small.config import RecipeError
from rl_small.rollout.base import SamplingSpec, as_groups
from rl_small.sampling import PassRateTracker, dynamic_sample, group_signal, merge_round_metrics
from rl_small.tracking import timer
from rl_small.types import Group, Prompt, Rollout, batch_columns, flat_rollouts

if TYPE_CHECKING:
    from rl_small.config import RunConfig
    from rl_small.data.mixture import DomainMixture
    from rl_small.distributed import World
    from rl_small.rollout.base import RolloutBackend

log = logging.getLogger(__name__)


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class RolloutStream:
    """This process's scored groups, step after step, drawn alike on every process (``world``)."""

    def __init__(self, cfg: RunConfig, mixture: DomainMixture, backend: RolloutBackend, rewards: Any,
                 world: World) -> None:
        self.f = cfg.sampling  # the group filters' options (the sampling section)
        self.cfg, self.mixture, self.backend, self.rewards, self.world = cfg, mixture, backend, rewards, world
        r = cfg.rollout
        if r.async_generation and not getattr(backend, "thread_safe", False):  # generate() runs in a thread
            backend.close()
            raise RecipeError("rollout.async_generation needs the vllm_server backend (vllm installed), not "
                              f"{type(backend).__name__}")
        if r.async_generation and getattr(backend, "spawned", None) and not _has_gpu():  # servers on our cores
            log.warning("rollout.async_generation with a vLLM server spawned on this CPU: the server generates the "
                        "next step on the cores the update needs; on 2 cores steps were 4-5x slower than without it "
                        "(BENCHMARKS §3b). It pays where the server has cores or a GPU of its own.")
        self.spec = SamplingSpec(r.group_size, r.max_new_tokens, r.temperature, r.top_p, r.ignore_eos)
        self.pass_rates = PassRateTracker() if self.f.difficulty_filter else None
        self.signal = group_signal(self.f, [x.name for x in cfg.rewards]) if self.f.dynamic_sampling else None
        self.skipped = 0  # prompts the difficulty filter passed over in this step's draws
        self._prefetch: tuple[list[Prompt], Future[list[Rollout]]] | None = None
        self._cursor_snapshot: dict[str, Any] | None = None  # the cursor before the prefetched draw
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")

    def next_prompts(self, n: int | None = None) -> list[Prompt]:
        """This process's share of the next ``n`` (default ``prompts_per_step``) x processes prompts.

        Every process advances the same cursors (which are checkpointed) and keeps its own slice, so ranks never
        train on the same prompt in a step. With the difficulty filter, prompts whose running pass rate is 0 or
        1 are passed over (and counted); a whole epoch of them is an error, not an endless loop.
        """
        want = (n or self.cfg.rollout.prompts_per_step) * self.world.size
        skip = self.pass_rates.skip if self.pass_rates is not None else None
        out, skipped = self.mixture.draw(want, (lambda p: skip(p.id)) if skip else None)
        self.skipped += skipped
        return out[self.world.rank :: self.world.size]

    def score(self, groups: list[Group], step: int) -> dict[str, float]:
        """Fill each group's rewards and component scores; returns the reward metrics. The rewards see flat
        keyword lists (``group_id``: the group's place in ``groups``), TRL's reward-function contract."""
        rollouts = flat_rollouts(groups)
        totals, per, metrics = self.rewards.agreed(self.world,
            [r.text for r in rollouts],
            prompts=[r.prompt.text for r in rollouts],
            completion_ids=[r.completion_ids for r in rollouts],
            group_id=[k for k, g in enumerate(groups) for _ in g.rollouts],
            truncated=[r.truncated for r in rollouts],
            step=step,
            **batch_columns(rollouts),
        )
        start = 0
        for g in groups:
            end = start + len(g.rollouts)
            g.rewards, g.components = list(totals[start:end]), {k: list(v[start:end]) for k, v in per.items()}
            start = end
        metrics[M.REWARD_TOTAL] = float(np.mean(totals))
        return metrics

    def _draw(self, n: int, step: int, m: dict[str, float], rounds: list[tuple[int, dict[str, float]]]
              ) -> list[Group]:
        """Generate and score ``n`` prompts' groups (the prefetched ones when they are ``n``)."""
        t: dict[str, float] = {}
        pre = self._prefetch if self._prefetch is not None and len(self._prefetch[0]) == n else None
        with timer(t, M.TIME_PROMPTS):
            prompts = pre[0] if pre else self.next_prompts(n)
        with timer(t, M.TIME_ROLLOUT):
            rollouts = pre[1].result() if pre else self.backend.generate(prompts, self.spec)
            self._prefetch = None if pre else self._prefetch
        with timer(t, M.TIME_REWARD):
            groups = as_groups(prompts, rollouts, self.spec.n)
            rm = self.score(groups, step)
        m.update({k: m.get(k, 0.0) + v for k, v in t.items()})
        rounds.append((len(rollouts), rm))
        if self.pass_rates is not None:  # every process counts every process's completions: same skips
            name, threshold = self.f.pass_reward, self.f.pass_threshold
            seen = self.world.gather([(g.prompt.id, None if c is None else c >= threshold)
                                      for g in groups for c in g.components.get(name, [None] * len(g.rollouts))])
            self.pass_rates.update([pid for pid, _ in seen], [ok for _, ok in seen])
        return groups

    def next_groups(self, step: int, m: dict[str, float]) -> list[Group]:
        """The groups of training step ``step`` (0-based), this process's ``prompts_per_step`` of them; the
        stages prompts, rollout and reward are timed into ``m``, with the reward, sampling and rollout metrics.
        With dynamic sampling, groups without signal are dropped and more prompts drawn; the reward metrics
        then average over every generated completion of every round, not only the kept ones."""
        r, f = self.cfg.rollout, self.f
        rounds: list[tuple[int, dict[str, float]]] = []
        self.skipped = 0

        def draw(n: int) -> list[Group]:
            return self._draw(n, step, m, rounds)

        if self.signal is not None:
            groups, sm = dynamic_sample(draw, r.prompts_per_step, f.max_sampling_rounds, self.world, self.signal)
        else:
            groups, sm = draw(r.prompts_per_step), {}
        m.update(merge_round_metrics(rounds) | sm)
        if self.mixture.dynamic is not None:  # the domain weights follow the whole global batch on every process
            seen = self.world.gather([(g.prompt.columns["domain"], x) for g in groups if g.weight for x in g.rewards])
            m.update(self.mixture.observe([d for d, _ in seen], [x for _, x in seen]))
        if self.pass_rates is not None:
            m[M.SAMPLING_SKIPPED_PROMPTS] = float(self.skipped)
        real = [x for g in groups if g.weight for x in g.rollouts]  # not the filler groups of dynamic sampling
        m[M.ROLLOUT_LEN_MEAN] = float(np.mean([len(x.completion_ids) for x in real]))
        m[M.ROLLOUT_TRUNCATED_FRAC] = float(np.mean([x.truncated for x in real]))
        if f.overlong_filter:
            m[M.SAMPLING_OVERLONG_MASKED] = m[M.ROLLOUT_TRUNCATED_FRAC]
        if r.async_generation and step + 1 < self.cfg.train.steps:  # next step's rollouts, during the update
            self._cursor_snapshot = copy.deepcopy(self.mixture.state_dict())  # what a checkpoint resumes from
            nxt = self.next_prompts(r.prompts_per_step)
            self._prefetch = (nxt, self._pool.submit(self.backend.generate, nxt, self.spec))
        return groups

    @property
    def prefetched(self) -> list[Prompt]:
        """The prompts whose rollouts are being generated ahead (empty without async generation)."""
        return self._prefetch[0] if self._prefetch is not None else []

    def state_dict(self) -> dict[str, Any]:
        """``cursor`` (JSON: the data position to resume from, before any prefetched draw) and, with the
        difficulty filter, ``pass_rates``."""
        out: dict[str, Any] = {"cursor": self._cursor_snapshot if self._prefetch else self.mixture.state_dict()}
        if self.pass_rates is not None:
            out["pass_rates"] = self.pass_rates.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``'s output (``pass_rates`` may be missing: a run that did not filter)."""
        self.mixture.load_state_dict(state["cursor"])
        if self.pass_rates is not None and "pass_rates" in state:
            self.pass_rates.load_state_dict(state["pass_rates"])
