"""Sync verification (rl_small.rollout.sync_check): synthetic metric sequences, and a trainer whose sampler
keeps serving the initial policy (stale weights) while the rollouts claim the current version."""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import pytest

from rl_small.rollout.sync_check import SyncCheck, SyncError
from rl_small.types import Prompt, Rollout


def _rollouts(*versions: int) -> list[Rollout]:
    return [Rollout(Prompt("p", "x", ""), 0, [1], [2], "y", [-1.0], False, v) for v in versions]


def test_fp32_noise_never_alarms_and_a_jump_warns(caplog: pytest.LogCaptureFixture) -> None:
    check = SyncCheck(warn=5.0, error=None, min_delta=1e-3)
    noise = [1e-5, 3e-5, 2e-5, 8e-5, 1.5e-5, 4e-4]  # 4e-4 is 20x the median but below min_delta
    outs = [check.observe(v) for v in noise]
    assert outs[:2] == [{}, {}]  # warmup
    assert all(o["rollout/sync_alarm"] == 0.0 for o in outs[2:])
    assert outs[-1]["rollout/sampler_logp_jump"] == pytest.approx(4e-4 / 2e-5)
    with caplog.at_level(logging.WARNING, logger="rl_small.rollout"):
        out = check.observe(0.02, step=7)
    assert out["rollout/sync_alarm"] == 1.0 and out["rollout/sampler_logp_jump"] == pytest.approx(0.02 / 2.5e-5)
    assert "step 7: sampler/trainer log-prob difference 0.02" in caplog.text and check.alarms == 1
    # a persistent fault keeps alarming: alarming values do not become the baseline
    assert all(check.observe(0.02)["rollout/sync_alarm"] == 1.0 for _ in range(30))


def test_bf16_level_baseline_tolerates_its_own_spread_and_errors_past_the_threshold() -> None:
    check = SyncCheck(warn=5.0, error=50.0, min_delta=1e-3)
    for v in [0.020, 0.025, 0.018, 0.030, 0.022, 0.060]:  # 0.06 is 2.7x the median: noise at this level
        assert check.observe(v).get("rollout/sync_alarm", 0.0) == 0.0
    assert check.observe(0.2)["rollout/sync_alarm"] == 1.0  # 8.5x the median 0.0235: warning
    with pytest.raises(SyncError, match=r"step 12: .* 1.5 nats/token is 63.8x its running median 0.0235 .*"
                                        r"sync_check_error=50"):
        check.observe(1.5, step=12)


def test_baselines_are_kept_per_version_lag(caplog: pytest.LogCaptureFixture) -> None:
    """sync_every=2: every other step trains on one-version-old rollouts, whose difference is higher by design."""
    check = SyncCheck(warn=5.0, error=None, min_delta=1e-3, max_lag=1)
    outs = []
    for step in range(12):
        lag = step % 2
        m = {"rollout/sampler_logp_absdiff": 1e-4 if lag == 0 else 0.05}
        outs.append(check(m, _rollouts(step - lag, step - lag), step))
    assert [o["rollout/version_lag"] for o in outs] == [0.0, 1.0] * 6
    assert not any(o.get("rollout/sync_alarm") for o in outs)
    # a step that claims lag 0 but carries the one-step-stale difference is the stale-weights signature
    assert check({"rollout/sampler_logp_absdiff": 0.05}, _rollouts(12), 12)["rollout/sync_alarm"] == 1.0
    with caplog.at_level(logging.WARNING, logger="rl_small.rollout"):
        out = check({}, _rollouts(3, 5), 6)  # lag 3 > max_lag 1; no sampler logprobs: no jump metric
    assert out == {"rollout/version_lag": 3.0} and "3 versions old (expected at most 1)" in caplog.text


class _StaleSampler:
    """The fake backend, with sampler logprobs from ``stale`` when set (else from the live policy), under the
    version the trainer last synced: a sampler that claims new weights and serves old ones."""

    def __init__(self, inner: Any, trainer: Any) -> None:
        self.inner, self.trainer = inner, trainer
        self.stale: Any = None

    @property
    def version(self) -> int:
        return self.inner.version

    def generate(self, prompts: list[Prompt], spec: Any) -> list[Rollout]:
        import torch

        from rl_small.logprobs import completion_logprobs

        tr = self.trainer
        rs = self.inner.generate(prompts, spec)
        model = self.stale or tr.acc.unwrap_model(tr.model)
        with torch.no_grad():
            logp, _ = completion_logprobs(model, rs, tr.tok.pad_token_id, tr.cfg.rollout.temperature or 1.0)
        return [dataclasses.replace(r, sampler_logprobs=logp[i, : len(r.completion_ids)].tolist())
                for i, r in enumerate(rs)]

    def sync(self, weights: Any, version: int) -> None:
        self.inner.sync(weights, version)

    def close(self) -> None:
        self.inner.close()


def test_trainer_alarms_when_the_sampler_serves_stale_weights(tiny_overrides: list[str], tmp_path: Any,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from rl_small.config import load_recipe
    from rl_small.trainer import Trainer

    over = tiny_overrides + ["rollout.backend=fake", "rollout.fake_completions=['1 + 1 = 2', '3', 'x y z 7']",
                             "rewards=[{name: 'tests.helpers:token_reward'}]", "rollout.sync_check_error=null",
                             "train.steps=10"]
    tr = Trainer(load_recipe(None, over), tmp_path / "run")
    sampler = _StaleSampler(tr.backend, tr)
    tr.backend = tr.stream.backend = sampler
    initial = copy.deepcopy(tr.acc.unwrap_model(tr.model)).eval()
    fresh = [tr.step() for _ in range(4)]
    assert all(m["rollout/version_lag"] == 0.0 and m["rollout/sampler_logp_absdiff"] < 1e-4 for m in fresh)
    assert all(m["rollout/sync_alarm"] == 0.0 for m in fresh[2:])
    sampler.stale = initial  # weights stop reaching the sampler; rollouts still say "current version"
    with caplog.at_level(logging.WARNING, logger="rl_small.rollout"):
        stale = tr.step()
    assert stale["rollout/version_lag"] == 0.0 and stale["rollout/sync_alarm"] == 1.0
    assert stale["rollout/sampler_logp_absdiff"] > 1e-3 and stale["rollout/sampler_logp_jump"] > 50
    assert "step 5: sampler/trainer log-prob difference" in caplog.text
    tr.sync_check.error = 50.0  # the default threshold: a run stops instead of training on the wrong policy
    with pytest.raises(SyncError, match="step 6: .*sampler is likely not serving the trained weights"):
        tr.step()


def test_a_rank_without_sampler_logprobs_skips_the_check_on_every_rank_without_hanging() -> None:
    """One process's batch had a short sampler logprob list (no sampler_logp): every process still joins the
    reduction and all skip the jump check alike (a rank that returned early left the others blocked: DDP hang)."""
    import threading
    from collections import deque

    from tests.helpers import ThreadWorld

    def run(values: list[float | None]) -> list[dict[str, float]]:
        shared = {"barrier": threading.Barrier(2, timeout=30), "slots": [None, None]}
        worlds = [ThreadWorld(r, 2, shared) for r in range(2)]
        checks = [SyncCheck(warn=5.0, error=None, history={0: deque([0.01, 0.01])}) for _ in worlds]

        def one(w: ThreadWorld) -> dict[str, float]:
            v = values[w.rank]
            return checks[w.rank]({} if v is None else {"rollout/sampler_logp_absdiff": v}, _rollouts(3), 3, w)

        return ThreadWorld.run(worlds, one)

    assert run([0.02, None]) == [{"rollout/version_lag": 0.0}] * 2
    both = run([0.02, 0.04])  # mean 0.03 = 3x the median 0.01: measured, below the warn level
    assert [o["rollout/sampler_logp_jump"] for o in both] == [pytest.approx(3.0)] * 2
    assert all(o["rollout/sync_alarm"] == 0.0 for o in both)
