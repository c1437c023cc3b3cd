"""Benchmark: how a training step's cost grows with the group size and the completion length.

    python bench/scaling.py [--steps 3] [--warmup 1] [--prompts 2] [--groups 4,8,16] [--lengths 128,256,512]
                            [--base-group 8] [--base-length 128] [--no-memory] [key=value overrides ...]

rl-small with the ``hf`` backend (the CPU default) on SmolLM2-135M-Instruct + LoRA r=16, GRPO, GSM8K train
prompts (``recipes/smollm2-135m/grpo/gsm8k.yaml``; the built-in ``arith`` task when the local data of ``rl-small data download`` is absent),
``--prompts`` prompts per step. Every completion is exactly L tokens long (``rollout.ignore_eos``), so the
cost is measured at the stated length rather than at whatever the model chose to write. Two sweeps:
G in --groups at L = --base-length, and L in --lengths at G = --base-group. Then, unless --no-memory, the
Memory-R+ recipe (``recipes/smollm2-135m/memory_r_plus/arith.yaml``: math_accuracy + boxed_format +
episodic_memory with the MiniLM encoder) at its own settings, for the share of the step that rewards take
with the heaviest reward we ship.

Each configuration is a fresh process: --warmup untimed steps, then --steps timed steps (the repetitions;
spread reported). Ratios are against the smallest configuration of the same sweep, measured in the same
invocation. Prints a table and writes bench/results/scaling.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import data_root, fmt, run_worker, save_results, spread

from rl_small import metric_names as M

ROOT = Path(__file__).resolve().parents[1]
GSM8K = data_root() / "gsm8k"  # rl-small data download --out data (or $RL_SMALL_DATA)
STAGES = ("step", "rollout", "reward", "prepare", "update")


def worker(recipe: str | None, steps: int, warmup: int, overrides: list[str], work: Path) -> dict[str, Any]:
    from rl_small.config import load_recipe
    from rl_small.trainer import Trainer

    fixed = ["rollout.backend=hf", "train.eval_before=false", "train.eval_after=false", "train.progress=false",
             "train.save_every=0", "train.trackers=[]", f"train.output_dir={work}", "train.run_name=r",
             f"train.steps={steps + warmup}"]
    tr = Trainer(load_recipe(recipe, fixed + overrides), work / "r")
    try:
        rows = [tr.step() for _ in range(steps + warmup)][warmup:]  # untimed warm-up steps first
    finally:
        tr.backend.close()
    keep = [k for k in M.STAGES if k.split("/", 1)[1] in STAGES]
    completions = tr.cfg.rollout.prompts_per_step * tr.cfg.rollout.group_size
    return {"steps": [{k.split("/", 1)[1]: v for k, v in r.items() if k in keep or k.startswith(M.reward_time(""))}
                      | {"tokens": r[M.ROLLOUT_LEN_MEAN] * completions} for r in rows]}


def worker_main(argv: list[str]) -> None:
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--recipe", default=None)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        res = worker(a.recipe, a.steps, a.warmup, a.overrides, Path(tmp))
    Path(a.out).write_text(json.dumps(res))


def configs(args: Any) -> list[dict[str, Any]]:
    """The sweeps: (sweep, G, L, recipe, overrides) of every configuration to run."""
    if GSM8K.exists():
        task = ["--recipe", str(ROOT / "recipes/smollm2-135m/grpo/gsm8k.yaml"), f"data.path={GSM8K}",
                "optim.warmup_steps=0"]
    else:
        task = []
    out = []
    for sweep, pairs in (("group", [(g, args.base_length) for g in args.groups]),
                         ("length", [(args.base_group, L) for L in args.lengths])):
        for g, L in pairs:
            over = [*task, f"rollout.group_size={g}", f"rollout.max_new_tokens={L}", "rollout.ignore_eos=true",
                    f"rollout.prompts_per_step={args.prompts}", *args.overrides]
            out.append({"sweep": sweep, "G": g, "L": L, "args": over})
    if not args.no_memory:
        rec = str(ROOT / "recipes/smollm2-135m/memory_r_plus/arith.yaml")
        out.append({"sweep": "memory_r_plus", "G": 8, "L": 48, "args": ["--recipe", rec, *args.overrides]})
    return out


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    base: dict[str, float] = {}
    for r in results:
        steps = r["steps"]
        step_mean = statistics.mean(s["step"] for s in steps)
        base.setdefault(r["sweep"], step_mean)
        tokens = [s["tokens"] for s in steps]
        row = {"sweep": r["sweep"], "G": r["G"], "L": r["L"],
               "stages_s": {k: spread([s.get(k, 0.0) for s in steps]) for k in STAGES},
               "completion_tokens_per_step": statistics.mean(tokens),
               "rollout_ms_per_token": spread([1000 * s["rollout"] / t for s, t in zip(steps, tokens, strict=True)]),
               "reward_share": spread([s["reward"] / s["step"] for s in steps]),
               "reward_components_s": {k.split("/", 1)[1]: statistics.mean(s[k] for s in steps)
                                       for k in steps[0] if k.startswith("reward/")},
               "step_vs_first_of_sweep": step_mean / base[r["sweep"]]}
        rows.append(row)
    return rows


def report(rows: list[dict[str, Any]], args: Any) -> None:
    print(f"\nStep time vs group size and completion length: hf backend, {args.prompts} prompts/step, "
          f"{args.steps} timed steps each, seconds: mean [min-max]")
    head = f"{'sweep':<14}{'G':>4}{'L':>5}{'tokens':>8}" + "".join(f"{k:>18}" for k in STAGES)
    print(head + f"{'ms/token gen':>14}{'x first':>9}{'reward %':>10}")
    for r in rows:
        print(f"{r['sweep']:<14}{r['G']:>4}{r['L']:>5}{r['completion_tokens_per_step']:>8.0f}"
              + "".join(f"{fmt(r['stages_s'][k]):>18}" for k in STAGES)
              + f"{r['rollout_ms_per_token']['mean']:>14.1f}{r['step_vs_first_of_sweep']:>9.2f}"
              + f"{100 * r['reward_share']['mean']:>10.2f}")


def main() -> None:
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--groups", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8, 16])
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[128, 256, 512])
    ap.add_argument("--base-group", type=int, default=8)
    ap.add_argument("--base-length", type=int, default=128)
    ap.add_argument("--no-memory", action="store_true", help="skip the Memory-R+ reward-share configuration")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one configuration may take")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        for i, c in enumerate(configs(args)):
            res = run_worker(sys.executable, Path(__file__).resolve(), ["--worker", "--steps", str(args.steps),
                             "--warmup", str(args.warmup), *c["args"]], Path(tmp) / f"{i}.json", args.timeout)
            results.append({**c, **res})
            print(f"{c['sweep']} G={c['G']} L={c['L']}: steps {[round(s['step'], 1) for s in res['steps']]} s",
                  flush=True)
    rows = summarize(results)
    report(rows, args)
    path = save_results("scaling", {"settings": vars(args), "rows": rows, "runs": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
