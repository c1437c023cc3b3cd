"""PPO with a critic, the GRPO-family options and batch-level sampling inside real training steps on the tiny
random model (CPU, seconds): parameters that must move do, state survives save/resume exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rl_small.config import RecipeError, load_recipe
from rl_small.trainer import Trainer

TOKEN_REWARD = "rewards=[{name: 'tests.helpers:token_reward'}]"
# Scripted completions (no generation cost); each group of 4 gets all four, so rewards differ within a group.
FAKE_MIXED = ["rollout.backend=fake", "rollout.fake_completions=['1', '22', '3 4', '5 6 7']"]


def _trainer(overrides: list[str], run_dir: Path, resume: bool = False) -> Trainer:
    return Trainer(load_recipe(None, overrides), run_dir, resume=resume)


def _params(tr: Trainer) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in tr.acc.unwrap_model(tr.model).named_parameters()}
    if tr.critic is not None:
        out |= {f"head.{n}": p.detach().clone() for n, p in tr.critic.head.named_parameters()}
    return out


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], part: str) -> list[str]:
    return [n for n in before if part in n and not torch.equal(before[n], after[n])]


def test_ppo_step_updates_policy_and_critic(tiny_overrides: list[str], tmp_path: Path) -> None:
    tr = _trainer(tiny_overrides + [TOKEN_REWARD, "algo.name=ppo", "algo.minibatches=2"], tmp_path / "run")
    peft = tr.acc.unwrap_model(tr.model)
    assert set(peft.peft_config) == {"default", "critic"}
    before = _params(tr)
    m = tr.step()
    after = _params(tr)
    for key in ("loss/policy", "loss/value", "loss/total", "optim/grad_norm", "critic/grad_norm", "policy/entropy"):
        assert math.isfinite(m[key]), key
    assert m["loss/value"] > 0 and m["critic/grad_norm"] > 0 and m["optim/grad_norm"] > 0
    assert _changed(before, after, ".default."), "no policy LoRA parameter changed"
    assert _changed(before, after, "lora_B.critic."), "the critic adapter did not change"
    assert _changed(before, after, "head."), "the value head did not change"
    base = [n for n in before if "lora_" not in n and not n.startswith("head.")]
    assert base and not _changed({n: before[n] for n in base}, after, ""), "a base weight changed"
    # the policy adapter is active again (generation and the reference must never see the critic)
    assert peft.active_adapter == "default"
    assert all(p.requires_grad for n, p in peft.named_parameters() if ".default." in n)


def test_ppo_resume_restores_critic_and_optimizers_exactly(tiny_overrides: list[str], tmp_path: Path) -> None:
    common = tiny_overrides + FAKE_MIXED + [TOKEN_REWARD, "algo.name=ppo", "algo.minibatches=2", "train.save_every=1"]
    full = _trainer(common + ["train.steps=2"], tmp_path / "full")
    full.fit()
    _trainer(common + ["train.steps=1"], tmp_path / "cut").fit()
    resumed = _trainer(common + ["train.steps=2"], tmp_path / "cut", resume=True)
    assert resumed.step_no == 1
    resumed.fit()
    a, b = _params(full), _params(resumed)
    assert any(".critic." in n for n in a) and "head.weight" in a
    # 1e-5: two CPU threads reduce some gradients in a varying order (seen: 1.2e-6 on a critic LoRA weight),
    # and Adam turns such float noise into update noise of the same order; a real resume bug is far larger.
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-5, msg=f"{n} differs after resume")
    assert full.critic is not None and resumed.critic is not None
    sa, sb = full.critic.optimizer.state_dict()["state"], resumed.critic.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:
        torch.testing.assert_close(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"], rtol=0, atol=1e-9)
    assert full.critic.scheduler is not None and resumed.critic.scheduler is not None
    assert full.critic.scheduler.state_dict() == resumed.critic.scheduler.state_dict()
    ckpt = max((tmp_path / "cut/checkpoints").iterdir())
    assert (ckpt / "adapter/critic/adapter_config.json").exists()  # both adapters are saved with PEFT too


def test_ppo_needs_lora_and_a_grpo_checkpoint_is_not_a_ppo_one(tiny_overrides: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="algo.name=ppo needs model.lora"):
        _trainer(tiny_overrides + ["model.lora=null", "algo.name=ppo"], tmp_path / "a")
    _trainer(tiny_overrides + FAKE_MIXED + [TOKEN_REWARD, "train.steps=1"], tmp_path / "grpo").fit()
    with pytest.raises(RecipeError, match="no critic state"):
        _trainer(tiny_overrides + FAKE_MIXED + [TOKEN_REWARD, "algo.name=ppo"], tmp_path / "grpo", resume=True)


@pytest.mark.parametrize(
    "options",
    [
        ["algo.name=reinforce_pp", "algo.kl_mode=reward", "algo.kl_coef=0.1", "algo.kl_estimator=k1"],
        ["algo.name=grpo", "algo.kl_coef=0.1", "algo.kl_estimator=k2", "algo.dual_clip=3.0", "algo.entropy_coef=0.01",
         "algo.epochs=2"],
        ["algo.name=dr_grpo", "algo.kl_mode=reward", "algo.kl_coef=0.1", "algo.loss_agg=seq_mean_token_sum_norm"],
    ],
    ids=["reinforce_pp-kl_reward", "grpo-kl_loss-dual_clip-entropy", "dr_grpo-kl_reward"],
)
def test_estimator_and_kl_options_train(tiny_overrides: list[str], tmp_path: Path, options: list[str]) -> None:
    # entropy_log_every=1: the entropy metric on the second step too (the default computes it every 5th step)
    tr = _trainer(tiny_overrides + FAKE_MIXED + [TOKEN_REWARD, "algo.entropy_log_every=1", *options], tmp_path / "run")
    before = _params(tr)
    tr.step()
    m = tr.step()  # second step: the policy differs from the reference, so every KL is non-zero
    assert all(math.isfinite(v) for v in m.values())
    assert m["policy/kl"] != 0 and m["policy/entropy"] > 0
    if "algo.kl_mode=reward" in options:
        assert m["reward/kl_penalty"] != 0 and m["loss/kl"] == 0  # penalised in the reward, not in the loss
    else:
        assert m["loss/kl"] == m["policy/kl"]
    assert _changed(before, _params(tr), "lora_")


FAKE = ["rollout.backend=fake", "rollout.group_size=4"]


def test_dynamic_sampling_refills_with_informative_groups(tiny_overrides: list[str], tmp_path: Path) -> None:
    # The fake backend cycles 8 completions: every first group is "1" x 4 (tied reward), every second mixed.
    fake = FAKE + ["rollout.fake_completions=['1', '1', '1', '1', '1', '1', '1', '22']"]
    tr = _trainer(tiny_overrides + fake + [TOKEN_REWARD, "sampling.dynamic_sampling=true"], tmp_path / "run")
    m = tr.step()
    # round 1: 2 prompts, 1 tied group dropped; round 2 asks for ceil(1 * 2 / 1) = 2 more, keeps 1 -> full
    assert m["sampling/rounds"] == 2 and m["sampling/dropped_groups"] == 2 and m["sampling/kept_groups"] == 2
    assert m["sampling/batch_fill"] == 1.0 and m["rollout/zero_adv_groups"] == 0.0
    assert tr.stream.mixture.cursor["arith"]["index"] == 4  # four prompts drawn for a two-prompt batch
    off = _trainer(tiny_overrides + fake + [TOKEN_REWARD], tmp_path / "off")
    assert off.step()["rollout/zero_adv_groups"] == 0.5 and off.stream.mixture.cursor["arith"]["index"] == 2


def test_overlong_filter_masks_truncated_completions(tiny_overrides: list[str], tmp_path: Path) -> None:
    # Every completion is longer than max_new_tokens = 8, so every one is truncated.
    fake = FAKE + ["rollout.fake_completions=['1 2 3 4 5 6 7 8 9 10', '9 8 7 6 5 4 3 2 1 0 9 8']"]
    tr = _trainer(tiny_overrides + fake + [TOKEN_REWARD, "sampling.overlong_filter=true"], tmp_path / "on")
    before = _params(tr)
    m = tr.step()
    assert m["rollout/truncated_frac"] == 1.0 and m["sampling/overlong_masked"] == 1.0
    assert m["optim/grad_norm"] == 0.0 and not _changed(before, _params(tr), "lora_")
    off = _trainer(tiny_overrides + fake + [TOKEN_REWARD], tmp_path / "off")
    assert off.step()["optim/grad_norm"] > 0  # the same batch does train without the filter


def test_difficulty_filter_skips_decided_prompts_and_is_checkpointed(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    from rl_small.config import RecipeError

    fake = FAKE + ["rollout.fake_completions=['\\boxed{1}']", "data.num_train=6", "sampling.difficulty_filter=true"]
    tr = _trainer(tiny_overrides + fake, tmp_path / "run")
    assert tr.stream.pass_rates is not None
    m = tr.step()  # rewards: math_accuracy + boxed_format; a pass is math_accuracy >= 0.5
    assert len(tr.stream.pass_rates.stats) == 2 and all(st[1] == 4 for st in tr.stream.pass_rates.stats.values())
    assert m["sampling/skipped_prompts"] == 0
    order = [tr.train_prompts[i].id for i in tr.stream.mixture._order("arith", 1)]
    # order[0] is mixed, order[1] unseen, order[2] always solved, order[3] never solved
    tr.stream.pass_rates.stats = {order[0]: [1, 2], order[2]: [4, 4], order[3]: [0, 4]}
    tr.stream.mixture.cursor["arith"] = {"epoch": 1, "index": 0}
    assert [p.id for p in tr.stream.next_prompts()] == order[0:2]
    assert [p.id for p in tr.stream.next_prompts()] == order[4:6] and tr.stream.skipped == 2
    tr.save()
    resumed = _trainer(tiny_overrides + fake, tmp_path / "run", resume=True)
    assert resumed.stream.pass_rates is not None and resumed.stream.pass_rates.stats == tr.stream.pass_rates.stats
    tr.stream.pass_rates.stats = {pid: [0, 4] for pid in order}  # every prompt decided: an error, not a hang
    with pytest.raises(RuntimeError, match="all 6 training prompts have a pass rate of 0 or 1"):
        tr.stream.next_prompts()
    with pytest.raises(RecipeError, match="sampling.pass_reward 'nope' is not one of the recipe's rewards"):
        _trainer(tiny_overrides + fake + ["sampling.pass_reward=nope"], tmp_path / "bad")


@pytest.mark.parametrize("offset,factor", [(0.0, 1.0), (math.log(2.0), 2.0), (math.log(8.0), 3.0)])
def test_tis_weights_scale_the_policy_loss(tiny_overrides: list[str], tmp_path: Path, offset: float,
                                           factor: float) -> None:
    """Sampler logprobs = the trainer's own minus ``offset``: every token's weight is min(e^offset, cap=3), so
    the policy loss is ``factor`` times the loss of the same step without sampler logprobs."""
    from rl_small.logprobs import completion_logprobs

    losses = []
    for with_sampler in (False, True):
        tr = _trainer(tiny_overrides + [TOKEN_REWARD, *FAKE_MIXED, "algo.tis_cap=3.0"], tmp_path / f"r{with_sampler}")
        generate = tr.backend.generate

        def with_logprobs(prompts, spec, generate=generate, tr=tr, on=with_sampler):  # noqa: ANN001, ANN202
            rs = generate(prompts, spec)
            if on:
                with torch.no_grad():
                    lp, _ = completion_logprobs(tr.model, rs, tr.tok.pad_token_id, tr.cfg.rollout.temperature)
                for i, r in enumerate(rs):
                    r.sampler_logprobs = (lp[i, : len(r.completion_ids)] - offset).tolist()
            return rs

        tr.backend.generate = with_logprobs
        m = tr.step()
        assert ("rollout/sampler_logp_absdiff" in m) == with_sampler
        if with_sampler:
            assert m["rollout/sampler_logp_absdiff"] == pytest.approx(offset, abs=1e-4)
            assert m["rollout/tis_cap_frac"] == (1.0 if factor == 3.0 else 0.0)
        losses.append(m["loss/policy"])
    assert abs(losses[0]) > 1e-3  # token_mean over unequal lengths: the on-policy loss is not zero
    assert losses[1] == pytest.approx(factor * losses[0], rel=1e-4)


def test_critic_head_sits_beside_the_models_weights(tiny_model_dir: Path) -> None:
    """On a GPU the critic's value head must be on the GPU with the hidden states it reads (it was created on
    the CPU). A policy moved to the ``meta`` device stands in for the GPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rl_small.config import LoraSpec
    from rl_small.critic import Critic

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).to("meta")
    critic = Critic(model, LoraSpec(r=4, alpha=8, targets=["q_proj", "v_proj"]), lr=1e-3)
    assert {p.device.type for p in critic.head.parameters()} == {"meta"}  # (PEFT puts the critic's LoRA
    # weights beside their base layers itself on a GPU; it leaves them on the CPU for a meta base, so not here)


def test_checkpoint_rng_carries_the_gpus_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed GPU run must draw the same samples and dropout masks as an uninterrupted one: the checkpoint's
    RNG state holds each CUDA generator and restores it (CUDA is faked here: no GPU on CI)."""
    from rl_small import checkpoint

    gens = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: gens)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = checkpoint.rng_state()
    assert state["cuda"] is gens
    checkpoint.set_rng_state(state)
    assert restored == [gens]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # another machine shape: left as it is
    checkpoint.set_rng_state(state)
    assert len(restored) == 1


def test_completion_dumps_every_n_steps_and_resume_drops_redone_steps(tiny_overrides: list[str],
                                                                     tmp_path: Path) -> None:
    """``train.log_completions_every=2``: steps 2 and 4 write one line per completion with its reward,
    components and advantage (GRPO: each group's advantages sum to 0); a resume from step 2 drops step 4's."""
    from rl_small.tracking import truncate_metrics

    run = tmp_path / "run"
    tr = _trainer(tiny_overrides + FAKE_MIXED + [TOKEN_REWARD, "train.log_completions_every=2", "train.steps=4"], run)
    rewards = {}
    for _ in range(4):
        rewards[tr.step_no + 1] = tr.step()["reward/total"]
    rows = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    n = tr.cfg.rollout.prompts_per_step * tr.cfg.rollout.group_size
    assert [r["step"] for r in rows] == [2] * n + [4] * n
    assert {r["completion"] for r in rows} == {"1", "22", "3 4", "5 6 7"}
    for step in (2, 4):
        mine = [r for r in rows if r["step"] == step]
        assert math.isclose(sum(r["reward"] for r in mine) / n, rewards[step], rel_tol=1e-6)
        assert all(r["components"]["tests.helpers:token_reward"] == r["reward"] for r in mine)
        for g in {r["group"] for r in mine}:
            assert abs(sum(r["advantage"] for r in mine if r["group"] == g)) < 1e-4
    assert truncate_metrics(run, 2, name="completions.jsonl") == n
    assert {json.loads(line)["step"] for line in (run / "completions.jsonl").read_text().splitlines()} == {2}
