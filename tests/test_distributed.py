"""Data parallelism on CPU: ``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPU) against one process with the same
global batch and seed, with the ``fake`` backend (which returns, per process, what one process would return for
the same prompts). GRPO, PPO and DAPO-style runs (dynamic sampling, difficulty filter, domain weights, token-mean
loss with different token counts per process): the trained LoRA weights must agree within 1e-5, and the batch
metrics, data cursor and pass-rate state must be the same. Also: resuming a 2-process run, sharded launches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import json

import pytest
import torch

from tests.helpers import free_port

FAKE = ["rollout.backend=fake", "rollout.fake_completions=['1', '22', '3 4', '5 6 7']"]


def _overrides(tiny_overrides: list[str], out: Path, name: str, prompts_per_process: int) -> list[str]:
    keep = [o for o in tiny_overrides if not o.startswith(("train.output_dir", "train.run_name", "rollout.backend"))]
    return keep + FAKE + [
        "rewards=[{name: 'tests.helpers:token_reward'}]", f"rollout.prompts_per_step={prompts_per_process}",
        "train.steps=2", "algo.micro_batch_size=2", f"train.output_dir={out}", f"train.run_name={name}",
        # Adam's first steps are ~ lr x sign(gradient): a gradient that is 0 up to float noise (lora_A while
        # lora_B is still 0) would flip signs between reduction orders. A large eps makes the update ~ lr x g,
        # so the weights compare the gradients themselves.
        "optim.lr=0.5", "optim.eps=1.0", "optim.max_grad_norm=1000",
    ]


def _run(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(cwd))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd[:6])} ... failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _lora(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_two_gloo_processes_match_one_process(tiny_overrides: list[str], tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    _run([sys.executable, "-m", "rl_small.train", *_overrides(tiny_overrides, tmp_path, "single", 2)], repo)
    # `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.15's CPU path is the simple
    # launcher); --multi_gpu goes through torchrun, and the trainer's Accelerator(cpu=True) then uses gloo.
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
          "-m", "rl_small.train", *_overrides(tiny_overrides, tmp_path, "ddp", 1)], repo)
    one, two = _lora(tmp_path / "single"), _lora(tmp_path / "ddp")
    assert one.keys() == two.keys() and len(one) > 0
    diffs = {k: float((one[k] - two[k]).abs().max()) for k in one}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    moved = max(float(one[k].abs().max()) for k in one if "lora_B" in k)  # lora_B starts at zero
    assert moved > 1e-3, f"lora_B moved only {moved}: the comparison would say nothing"


MIX = ("data.mix=[{task: arith, name: easy, difficulty: 1, weight: 1.0}, "
       "{task: arith, name: hard, difficulty: 4, weight: 1.0}]")
BATCH_LEVEL = {
    # PPO: the critic's gradients are averaged by hand (it is not the DDP module), advantages are whitened over
    # the global batch; 3 scripted completions for groups of 4 give the processes different token counts.
    "ppo": ["algo.name=ppo", "rollout.fake_completions=['1', '3 4 5 6', '22']"],
    # DAPO-style: dynamic sampling (every even global group is tied, so each step takes two rounds), token-mean
    # loss over the global batch, the difficulty filter (3 prompts a domain: the second step meets prompts
    # already decided) and domain weights, all of which must agree between processes.
    "dapo": ["sampling.dynamic_sampling=true", "algo.loss_agg=token_mean", "sampling.difficulty_filter=true",
             "sampling.pass_reward=tests.helpers:token_reward", "sampling.pass_threshold=0.0", "data.num_train=3", MIX,
             "sampling.domain_sampling=true", "rollout.fake_completions=['1', '1', '1', '1', '1', '1', '1', '22']"],
}


@pytest.mark.parametrize("case", sorted(BATCH_LEVEL))
def test_batch_level_methods_on_two_processes_match_one(case: str, tiny_overrides: list[str], tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    extra = BATCH_LEVEL[case]
    _run([sys.executable, "-m", "rl_small.train", *_overrides(tiny_overrides, tmp_path, "single", 2), *extra], repo)
    _launch2([*_overrides(tiny_overrides, tmp_path, "ddp", 1), *extra], repo)
    one, two = _lora(tmp_path / "single"), _lora(tmp_path / "ddp")
    diffs = {k: float((one[k] - two[k]).abs().max()) for k in one}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    assert max(float(one[k].abs().max()) for k in one if "lora_B" in k) > 1e-3
    rows = {r: [json.loads(line) for line in (tmp_path / r / "metrics.jsonl").open()] for r in ("single", "ddp")}
    keys = [k for k in rows["single"][0] if k.startswith(("sampling/", "reward/total", "loss/", "critic/value"))]
    for a, b in zip(rows["single"], rows["ddp"], strict=True):  # the same batches, the same global metrics
        assert {k: round(a[k], 4) for k in keys} == {k: round(b[k], 4) for k in keys}
    ckpts = {r: tmp_path / r / "checkpoints" / "step_000002" for r in ("single", "ddp")}
    cursors = [json.loads((c / "trainer_state.json").read_text())["cursor"] for c in ckpts.values()]
    assert cursors[0] == cursors[1]
    states = {r: torch.load(c / "state.pt", weights_only=False) for r, c in ckpts.items()}
    if case == "dapo":
        assert rows["ddp"][1]["sampling/rounds"] == 2.0 and rows["ddp"][1]["sampling/skipped_prompts"] > 0
        assert states["single"]["extra"]["pass_rates"] == states["ddp"]["extra"]["pass_rates"]


def _launch2(args: list[str], repo: Path) -> None:
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
          "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
          "-m", "rl_small.train", *args], repo)


def test_two_processes_resume_as_the_uninterrupted_run(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Sampled rollouts (hf backend, T=1) scored by a reward whose state differs per rank (as an episodic
    memory's does): the resumed run matches the uninterrupted one only if every rank gets back its own reward
    state (and RNG stream), not rank 0's."""
    repo = Path(__file__).resolve().parents[1]
    keep = [o for o in tiny_overrides if not o.startswith(("train.output_dir", "train.run_name", "train.steps"))]
    common = [*keep, "rollout.temperature=1.0", "rollout.prompts_per_step=1", "algo.micro_batch_size=2",
              "rewards=[{name: 'tests.helpers:RunningSumReward'}]", "optim.lr=0.05", f"train.output_dir={tmp_path}"]
    _launch2([*common, "train.steps=3", "train.run_name=full"], repo)
    _launch2([*common, "train.steps=2", "train.run_name=cut"], repo)  # stops after the step-2 checkpoint
    _launch2(["--resume", str(tmp_path / "cut"), "train.steps=3"], repo)
    full, resumed = _lora(tmp_path / "full"), _lora(tmp_path / "cut")
    diffs = {k: float((full[k] - resumed[k]).abs().max()) for k in full}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    ranks = torch.load(tmp_path / "cut" / "checkpoints" / "step_000003" / "state.pt", weights_only=False)["ranks"]
    states = [r["rewards"]["tests.helpers:RunningSumReward"]["fn"]["total"] for r in ranks]
    assert len(ranks) == 2 and states[0] != states[1], states
    import json

    lens = [[json.loads(line)["rollout/len_mean"] for line in (tmp_path / r / "metrics.jsonl").open()] for r in
            ("full", "cut")]
    assert lens[0] == lens[1] and len(lens[0]) == 3  # step 3's sampled completions are the same after resuming


def test_sharded_launches_are_refused_with_the_config_named() -> None:
    from types import SimpleNamespace

    import pytest
    from accelerate.utils import DistributedType

    from rl_small.builders import check_run
    from rl_small.config import load_recipe

    cfg = load_recipe(None, [])
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ValueError, match=f"{kind.value} is not supported.*ddp.yaml"):
            check_run(cfg, SimpleNamespace(num_processes=2, distributed_type=kind))
    for extra in ([], ["algo.name=ppo", "sampling.dynamic_sampling=true", "sampling.difficulty_filter=true"]):  # DDP: fine
        check_run(load_recipe(None, extra), SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU))


def test_each_rank_loads_its_own_state_and_a_new_process_count_warns(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    import logging

    from rl_small.checkpoint import load_checkpoint, rng_state, save_checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.manual_seed(1)
    r0 = rng_state()
    torch.manual_seed(2)
    r1 = rng_state()
    path = save_checkpoint(tmp_path, 3, model, opt, sched, {}, {"m": "rank0"},
                           ranks=[{"rng": r0, "rewards": {"m": "rank0"}}, {"rng": r1, "rewards": {"m": "rank1"}}])
    with caplog.at_level(logging.WARNING, logger="rl_small.checkpoint"):
        assert load_checkpoint(path, model, opt, sched, rank=1, world=2)["rewards"] == {"m": "rank1"}
        assert torch.equal(torch.get_rng_state(), r1["torch"])
        assert not caplog.records
        assert load_checkpoint(path, model, opt, sched, rank=0, world=1)["rewards"] == {"m": "rank0"}
    assert "written by 2 process(es), resumed by 1" in caplog.text
