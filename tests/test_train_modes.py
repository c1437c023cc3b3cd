"""Training steps in the modes the GPU recipes use: gradient checkpointing, bf16, LoRA dropout.

Checkpointing must give the same update as no checkpointing (it only trades compute for memory); a bf16 step
and a dropout step must train; the no-grad passes (pi_old, pi_ref, critic values) must be deterministic."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rl_small.batch import fill_no_grad, pad_batch
from rl_small.config import load_recipe
from rl_small.logprobs import completion_logprobs
from rl_small.trainer import Trainer
from rl_small.types import TrainBatch

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


def _no_grad_passes(tr: Trainer) -> TrainBatch:
    """A fresh batch from ``tr`` with pi_old (and pi_ref, critic values when configured) filled."""
    batch = pad_batch(tr.stream.next_groups(tr.step_no, {}), tr.stream.f.overlong_filter)
    fill_no_grad(batch, tr.model, tr.critic, tr.cfg.algo, tr.tok.pad_token_id, 1.0)
    return batch


def test_lora_dropout_step_trains_and_no_grad_passes_are_deterministic(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    over = tiny_overrides + ["model.lora.dropout=0.5", "algo.name=ppo", "algo.epochs=2", "algo.kl_coef=0.05"]
    tr, m, before = _one_step(over, tmp_path / "run")
    assert math.isfinite(m["loss/policy"]) and m["optim/grad_norm"] > 0
    after = _lora(tr.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # lora_B (policy and critic adapters) is non-zero now, so dropout on the LoRA input would change the logprobs from call to call.
    tr.model.train()
    b1 = _no_grad_passes(tr)
    assert tr.model.training, "the no-grad passes did not restore train mode"
    assert b1.old_logp is not None and b1.ref_logp is not None
    assert b1.old_values is not None
    first, values = b1.old_logp.clone(), b1.old_values.clone()
    fill_no_grad(b1, tr.model, tr.critic, tr.cfg.algo, tr.tok.pad_token_id, 1.0)
    assert torch.equal(b1.old_logp, first), "pi_old differs between two no-grad passes (dropout masks)"
    assert torch.equal(b1.old_values, values), "the critic's old values differ between two no-grad passes"
    # ... while the update forward (train mode) does draw dropout masks: it differs from pi_old.
    lp, _ = completion_logprobs(tr.model, b1.rollouts, tr.tok.pad_token_id, 1.0)
    assert float(((lp.detach() - first[:, : lp.shape[1]]).abs() * b1.mask[:, : lp.shape[1]]).max()) > 1e-4


def test_no_dropout_first_update_ratio_is_one(tiny_overrides: list[str], tmp_path: Path) -> None:
    """dropout = 0: the eval-mode pi_old equals the train-mode update forward before any step (ratio 1)."""
    torch.manual_seed(0)
    tr = Trainer(load_recipe(None, tiny_overrides + [REWARD, "algo.epochs=2"]), tmp_path / "run")
    with torch.no_grad():
        for n, p in tr.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    tr.model.train()
    batch = _no_grad_passes(tr)
    assert batch.old_logp is not None
    lp, mask = completion_logprobs(tr.model, batch.rollouts, tr.tok.pad_token_id, 1.0)
    torch.testing.assert_close(lp.detach() * mask, batch.old_logp * batch.mask, atol=1e-6, rtol=1e-6)


def test_bf16_step_trains(tiny_overrides: list[str], tmp_path: Path) -> None:
    tr, m, before = _one_step(tiny_overrides + ["model.dtype=bfloat16", "algo.epochs=2"], tmp_path / "run")
    assert next(p for n, p in tr.model.named_parameters() if "lora_" not in n).dtype == torch.bfloat16
    assert math.isfinite(m["loss/policy"]) and math.isfinite(m["loss/total"]) and m["optim/grad_norm"] > 0
    after = _lora(tr.model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) == len(before), f"only {len(changed)}/{len(before)} LoRA tensors changed in bf16"


def test_entropy_metric_only_on_logging_steps_without_entropy_bonus(tiny_overrides: list[str], tmp_path: Path) -> None:
    """entropy_coef = 0: the entropy is computed on steps 0, N, 2N, ... (entropy_log_every = N) only."""
    tr = Trainer(load_recipe(None, tiny_overrides + [REWARD, "algo.entropy_log_every=2", "train.steps=3"]), tmp_path)
    m0, m1, m2 = tr.step(), tr.step(), tr.step()
    assert m0["policy/entropy"] > 0 and m2["policy/entropy"] > 0
    assert "policy/entropy" not in m1
