"""Fault injection: poison (non-finite gradients), kill (-9 mid-run, then --resume), hang (a reward past its
timeout), interrupt (SIGINT), and two runs on one directory. Each asserts that nothing is lost or corrupted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rl_small.config import load_recipe
from rl_small.guards import NonFiniteError, NonFiniteGuard
from rl_small.trainer import Trainer
from tests.helpers import ThreadWorld

TOKEN_REWARD = "rewards=[{name: 'tests.helpers:token_reward'}]"
FAKE = ["rollout.backend=fake", "rollout.fake_completions=['1', '22', '3 4', '5 6 7']"]


def _trainer(overrides: list[str], run_dir: Path, resume: bool = False) -> Trainer:
    return Trainer(load_recipe(None, overrides), run_dir, resume=resume)


def _params(tr: Trainer) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in tr.acc.unwrap_model(tr.model).named_parameters() if p.requires_grad}
    if tr.critic is not None:
        out |= {f"head.{n}": p.detach().clone() for n, p in tr.critic.head.named_parameters()}
    return out


def _poison(param: torch.nn.Parameter, steps: set[int], tr: Trainer) -> None:
    """Make the gradient of ``param`` NaN during the training steps ``steps`` (0-based step_no)."""
    param.register_hook(lambda g: g * float("nan") if tr.step_no in steps else g)


# ---- poison -------------------------------------------------------------------------------------------------
def test_nonfinite_gradient_skips_the_step_and_counts_it(tiny_overrides: list[str], tmp_path: Path) -> None:
    tr = _trainer(tiny_overrides + [TOKEN_REWARD, *FAKE, "train.steps=3"], tmp_path / "run")
    lora = next(p for n, p in tr.model.named_parameters() if "lora_A" in n)
    _poison(lora, {0}, tr)
    before = _params(tr)
    m = tr.step()
    assert m["optim/skipped_steps"] == 1.0 and math.isnan(m["optim/grad_norm"])
    after = _params(tr)
    assert all(torch.equal(before[n], after[n]) for n in before), "a skipped step changed a parameter"
    assert all(p.grad is None for p in tr.policy_params), "the poisoned gradients were kept"
    m2 = tr.step()  # the next, healthy step trains and resets the count
    assert m2["optim/skipped_steps"] == 0.0 and math.isfinite(m2["optim/grad_norm"])
    assert any(not torch.equal(before[n], p) for n, p in _params(tr).items())
    assert tr.nonfinite_guard.in_row == 0


def test_nonfinite_critic_gradient_skips_policy_and_critic(tiny_overrides: list[str], tmp_path: Path) -> None:
    tr = _trainer(tiny_overrides + [TOKEN_REWARD, *FAKE, "algo.name=ppo"], tmp_path / "run")
    assert tr.critic is not None
    _poison(next(tr.critic.head.parameters()), {0}, tr)
    before = _params(tr)
    m = tr.step()
    assert m["optim/skipped_steps"] == 1.0 and math.isnan(m["critic/grad_norm"])
    after = _params(tr)
    assert all(torch.equal(before[n], after[n]) for n in before), "policy or critic moved on a skipped step"


def test_k_nonfinite_steps_in_a_row_stop_the_run_naming_step_and_metric(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    tr = _trainer(tiny_overrides + [TOKEN_REWARD, *FAKE, "train.steps=5", "train.max_nonfinite_steps=2"],
                  tmp_path / "run")
    lora = next(p for n, p in tr.model.named_parameters() if "lora_A" in n)
    _poison(lora, {1, 2, 3}, tr)  # step 1 trains; steps 2 and 3 are poisoned
    with pytest.raises(NonFiniteError, match=r"step 3: 2 optimizer steps in a row .*optim/grad_norm=nan"):
        tr.fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"optim/skipped_steps": 1.0' in lines[1]


def test_every_process_skips_when_one_goes_nonfinite() -> None:
    worlds = ThreadWorld.group(2)

    def one(world: ThreadWorld) -> tuple[bool, dict[str, float]]:
        guard = NonFiniteGuard(3, world)
        stats: dict[str, float] = {"loss/total": float("nan") if world.rank == 1 else 0.5}
        return guard.skip(0, stats, {"optim/grad_norm": 1.0}), stats

    (skip0, stats0), (skip1, stats1) = ThreadWorld.run(worlds, one)
    assert skip0 and skip1
    assert stats0["optim/skipped_steps"] == stats1["optim/skipped_steps"] == 1.0


def test_a_loss_already_bad_earlier_in_the_step_does_not_skip_later_minibatches() -> None:
    guard = NonFiniteGuard(3, ThreadWorld.group(1)[0])
    stats = {"loss/total": float("nan")}
    assert guard.skip(0, stats, {"optim/grad_norm": 1.0})
    assert not guard.skip(0, stats, {"optim/grad_norm": 1.0}), "the same step's next minibatch was healthy"
    assert guard.skip(1, {"loss/total": float("inf")}, {"optim/grad_norm": 1.0}), "a new step is checked afresh"
