"""Every metric a run logs is a name of rl_small.metric_names, and the readers (report, progress bar) use them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl_small import metric_names as M
from rl_small.config import load_recipe
from rl_small.trainer import Trainer

FAKE = ["rollout.backend=fake", "rollout.fake_completions=['1', '\\boxed{2}', '333', 'x \\boxed{4}', '55']"]
RUNS = {
    "default": ["algo.entropy_log_every=1"],
    # the other metric families: critic, KL, dynamic sampling, difficulty filter, overlong filter, two rewards
    "ppo+filters": [*FAKE, "algo.name=ppo", "algo.kl_coef=0.05", "algo.epochs=2", "sampling.dynamic_sampling=true",
                    "sampling.dynamic_sampling_on=reward", "sampling.difficulty_filter=true", "sampling.overlong_filter=true",
                    "rewards=[{name: math_accuracy}, {name: 'tests.helpers:token_reward'}]"],
}


@pytest.mark.parametrize("case", sorted(RUNS))
def test_every_logged_metric_is_a_name_of_the_module(case: str, tiny_overrides: list[str], tmp_path: Path) -> None:
    cfg = load_recipe(None, [*tiny_overrides, *RUNS[case]])
    tr = Trainer(cfg, tmp_path / "run")
    tr.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in rows for k in r} - {"step", "time"}
    rewards = [c.name for c in tr.rewards.components]
    assert {M.REWARD_TOTAL, M.TIME_STEP, M.TIME_ROLLOUT, M.LOSS_POLICY, M.ROLLOUT_LEN_MEAN} <= keys
    assert [k for k in sorted(keys) if not M.is_metric(k, rewards)] == []
    if case != "default":
        assert {M.LOSS_VALUE, M.POLICY_KL, M.SAMPLING_ROUNDS, M.SAMPLING_SKIPPED_PROMPTS,
                M.SAMPLING_OVERLONG_MASKED, M.reward("tests.helpers:token_reward")} <= keys


def test_names_are_recognised_and_others_are_not() -> None:
    assert M.is_metric("reward/acc/timeouts", rewards=["acc"]) and M.is_metric("timing/reward/acc", rewards=["acc"])
    assert M.is_metric("sampling/domain_weight/easy", domains=["easy"]) and M.is_metric("eval/aime/pass@1",
                                                                                          benches=["aime"])
    assert not M.is_metric(M.OLD_TRUNCATED_FRAC)  # read for old runs only: nothing logs it any more
    assert not M.is_metric("reward/other", rewards=["acc"]) and not M.is_metric("timing/decode")


def test_the_report_draws_names_of_the_module() -> None:
    from rl_small.eval.report import CURVES

    olds = {M.OLD_TRUNCATED_FRAC, M.OLD_ENTROPY}
    assert all(k in M.NAMES or k in olds for keys, _, _ in CURVES for k in keys)
