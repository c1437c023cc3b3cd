"""Benchmark: does learning hold over seeds? Trains a recipe once per seed and reports each seed's held-out gain
(after - before, on the same problems), their mean and minimum and a 95 % interval of the mean; with
``--compare``, a second recipe on the same seeds and the paired difference between the two.

    python bench/seed_study.py --seeds 0 1 2 3 4 --out bench/results/seed_study_grpo            # default recipe
    python bench/seed_study.py --seeds 0 1 2 3 4 --recipe recipes/smollm2-135m/grpo/arith.yaml \
        --compare recipes/smollm2-135m/memory_r_plus/arith.yaml --out bench/results/memory_sparse data.difficulty=3

Each run is ``rl-small train [--recipe R] train.seed=S data.seed=S train.output_dir=RUNS train.run_name=LABEL_sS``
plus the given ``key=value`` overrides. A run that already finished (its summary.json has ``after``) is read, not
redone; one that was interrupted is resumed (``--resume``), so the study survives being stopped. ``data.seed``
changes the arith problems, held-out ones included: each seed's gain is paired on its own problems, and two
recipes at the same seed are evaluated on the same problems (the paired difference is after_A - after_B).

Statistics: per run, the gain and its standard error from the problem-by-problem counts (McNemar: problems only
``after`` solved vs only ``before`` solved); over seeds, mean, min and mean +/- t(0.975, n-1) x sd / sqrt(n).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import ROOT, machine, save_results

sys.path.insert(0, str(ROOT))
from rl_small import metric_names as M

# what each run's training did, first steps against last (why a seed gained little: no signal, or length)
DYNAMICS = {"train_acc": M.reward("math_accuracy"), "truncated": M.ROLLOUT_TRUNCATED_FRAC,
            "len": M.ROLLOUT_LEN_MEAN, "zero_adv": M.ROLLOUT_ZERO_ADV_GROUPS}

# two-sided 95 % Student t quantiles by degrees of freedom (the normal 1.96 beyond 30)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (the next tabulated smaller df: wider)."""
    if df < 1:
        raise ValueError(f"an interval needs at least 2 seeds (df={df})")
    return 1.96 if df > 30 else T975[max(k for k in T975 if k <= df)]


def interval(values: list[float]) -> dict[str, float]:
    """n, mean, min, max, sd and the 95 % t-interval of the mean (lo = hi = mean for a single value)."""
    n, mean = len(values), statistics.mean(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else 0.0
    return {"n": n, "mean": mean, "min": min(values), "max": max(values), "sd": sd, "lo": mean - half,
            "hi": mean + half}


def dynamics(metrics: Path, window: int = 5) -> dict[str, list[float | None]]:
    """Per DYNAMICS metric, its mean over the first and over the last ``window`` training steps of a run's
    metrics.jsonl (a metric the run did not log: None)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if M.LOSS_TOTAL in r]

    def mean(part: list[dict[str, Any]], key: str) -> float | None:
        vals = [r[key] for r in part if isinstance(r.get(key), (int, float))]
        return statistics.mean(vals) if vals else None

    return {k: [mean(steps[:window], key), mean(steps[-window:], key)] for k, key in DYNAMICS.items()}


def run_gain(summary: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """One finished run's held-out numbers: before, after, gain, and the gain's standard error (paired counts
    when the summary has them, else the two accuracies' binomial errors as if independent); with ``run_dir``,
    its training dynamics (``dynamics``)."""
    b, a = summary["before"], summary["after"]
    gain = a["accuracy"] - b["accuracy"]
    p = summary.get("paired")
    if p and p.get("problems"):
        n, up, down = p["problems"], p["after_only"], p["before_only"]
        se = math.sqrt(max(up + down - (up - down) ** 2 / n, 0.0)) / n
    else:
        se = math.sqrt(sum(x["accuracy"] * (1 - x["accuracy"]) / max(x["n"], 1) for x in (a, b)))
    out = {"seed": summary.get("seed"), "before": b["accuracy"], "after": a["accuracy"], "n": a["n"],
           "gain": gain, "gain_se": se, "train_seconds": summary.get("train_seconds")}
    if run_dir is not None and (run_dir / "metrics.jsonl").exists():
        out["dynamics"] = dynamics(run_dir / "metrics.jsonl")
    return out


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method: the gain over seeds (``interval``) and how many seeds ended below their base model; with a
    second method, the paired difference of held-out accuracy after training, seed by seed."""
    out: dict[str, Any] = {"methods": {}}
    for label, rows in runs.items():
        gains = [r["gain"] for r in rows]
        out["methods"][label] = {"gain": interval(gains), "below_base": sum(g < 0 for g in gains),
                                 "seeds": [r["seed"] for r in rows]}
    labels = list(runs)
    if len(labels) == 2:
        first = {r["seed"]: r for r in runs[labels[0]]}
        diffs = [r["after"] - first[r["seed"]]["after"] for r in runs[labels[1]] if r["seed"] in first]
        if diffs:
            out["paired"] = {"of": f"{labels[1]} - {labels[0]}", **interval(diffs), "per_seed": diffs}
    return out


def label_of(recipe: str | None) -> str:
    if recipe is None:
        return "default"
    parts = Path(recipe).with_suffix("").parts
    return "_".join(parts[-2:]) if len(parts) >= 2 else parts[-1]


def run_dir_of(recipe: str | None, seed: int, runs: Path) -> Path:
    return runs / f"{label_of(recipe)}_s{seed}"


def train(recipe: str | None, seed: int, runs: Path, overrides: list[str], python: str) -> dict[str, Any]:
    """The summary of this recipe's run for ``seed``: read when finished, else trained (or resumed) first."""
    run_dir = run_dir_of(recipe, seed, runs)
    name = run_dir.name
    summary_path = run_dir / "summary.json"
    if summary_path.exists() and "after" in (done := json.loads(summary_path.read_text())):
        return done
    cmd = [python, "-m", "rl_small.train"]
    if (run_dir / "checkpoints").exists():
        cmd += ["--resume", str(run_dir)]
    else:
        cmd += (["--recipe", recipe] if recipe else []) + [f"train.seed={seed}", f"data.seed={seed}",
                f"train.output_dir={runs}", f"train.run_name={name}", "train.progress=false", *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    summary = json.loads(summary_path.read_text())
    if "after" not in summary or "before" not in summary:
        raise RuntimeError(f"{run_dir}: the run has no before/after evaluation (train.eval_before/eval_after)")
    return summary


def table(result: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> str:
    def pair(r: dict[str, Any], key: str, fmt: str) -> str:
        first, last = r.get("dynamics", {}).get(key, [None, None])
        return "-" if first is None or last is None else f"{first:{fmt}} → {last:{fmt}}"

    header = ("| recipe | seed | held-out before | after (n) | gain, points (± se) | train acc, first 5 → last 5 steps "
              "| truncated | mean length | zero-advantage groups |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for label, rows in runs.items():
        for r in rows:
            lines.append(f"| {label} | {r['seed']} | {100 * r['before']:.1f}% | {100 * r['after']:.1f}% ({r['n']}) | "
                         f"{100 * r['gain']:+.1f} ± {100 * r['gain_se']:.1f} | {pair(r, 'train_acc', '.3f')} | "
                         f"{pair(r, 'truncated', '.2f')} | {pair(r, 'len', '.1f')} | {pair(r, 'zero_adv', '.2f')} |")
    lines += ["", "| recipe | seeds | mean gain | min | 95 % interval of the mean | seeds below base |",
              "|---|---|---|---|---|---|"]
    for label, m in result["methods"].items():
        g = m["gain"]
        lines.append(f"| {label} | {g['n']} | {100 * g['mean']:+.1f} | {100 * g['min']:+.1f} | "
                     f"[{100 * g['lo']:+.1f}, {100 * g['hi']:+.1f}] | {m['below_base']} |")
    if "paired" in result:
        p = result["paired"]
        lines += ["", f"Paired difference {p['of']} (held-out after, points): mean {100 * p['mean']:+.1f}, "
                  f"95 % interval [{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}], per seed "
                  + ", ".join(f"{100 * d:+.1f}" for d in p["per_seed"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--recipe", default=None, help="recipe (default: the default run)")
    ap.add_argument("--compare", default=None, help="a second recipe run on the same seeds")
    ap.add_argument("--runs", default="runs/seed_study", help="parent folder of the run directories")
    ap.add_argument("--out", default=None, help="results name (bench/results/<name>.json and .md)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every run")
    args = ap.parse_args(argv)
    runs_dir = Path(args.runs).resolve()
    runs: dict[str, list[dict[str, Any]]] = {}
    for recipe in [args.recipe] + ([args.compare] if args.compare else []):
        label = label_of(recipe)
        runs[label] = [run_gain(train(recipe, s, runs_dir, args.overrides, args.python),
                                run_dir_of(recipe, s, runs_dir)) for s in args.seeds]
    result = summarize(runs)
    text = table(result, runs)
    print(text)
    if args.out:
        name = Path(args.out).name
        save_results(name, {"argv": sys.argv, "machine": machine(), "runs": runs, **result})
        (Path(__file__).resolve().parent / "results" / f"{name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
