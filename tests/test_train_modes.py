"""Training steps in the modes the GPU recipes use: gradient checkpointing, bf16, LoRA dropout.

Checkpointing must give the same update as no checkpointing (it only trades compute for memory); a bf16 step
and a dropout step must train; the no-grad passes (pi_old, pi_ref, critic values) must be deterministic."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rl_small.config import load_recipe
from rl_small.trainer import Trainer

REWARD = "rewards=[{name: 'tests.helpers:token_reward'}]"


def _lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


def _one_step(
    overrides: list[str], run_dir: Path
) -> tuple[Trainer, dict[str, float], dict[str, torch.Tensor]]:
    """A fresh trainer (same seed: same adapter init and rollouts in every run), its adapter, one step."""
    torch.manual_seed(0)
    tr = Trainer(load_recipe(None, overrides + [REWARD]), run_dir)
    before = _lora(tr.model)
    return tr, tr.step(), before


def test_gradient_checkpointing_step_equals_plain_step(tiny_overrides: list[str], tmp_path: Path) -> None:
    common = tiny_overrides + ["algo.epochs=2"]  # the second epoch runs on an adapter that has moved
    plain, m0, init = _one_step(common, tmp_path / "plain")
    ckpt, m1, init1 = _one_step(common + ["model.gradient_checkpointing=true"], tmp_path / "ckpt")
    assert ckpt.model.get_base_model().model.layers[0].gradient_checkpointing
    assert m1["optim/grad_norm"] > 0
    assert math.isclose(m0["optim/grad_norm"], m1["optim/grad_norm"], rel_tol=1e-4)
    a, b = _lora(plain.model), _lora(ckpt.model)
    assert all(torch.equal(init[n], init1[n]) for n in init)
    assert any(not torch.equal(a[n], init[n]) for n in a), "the step did not move the adapter"
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-6, msg=f"{n} differs under checkpointing")
