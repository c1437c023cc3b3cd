"""Compare finished runs grouped by method, over seeds: held-out accuracy after training, training curves.

    python bench/compare_runs.py --out bench/results/memory_vs_grpo grpo=runs/memcmp/grpo_s* \
        memory_r_plus=runs/memcmp/memory_r_plus_s*

Each ``METHOD=GLOB`` names the run directories of one method (one per seed). Prints a table, writes
``<out>.json`` and ``<out>.md``: per run the held-out accuracy (summary.json) and the means of the first and
last five steps of training accuracy, completion length and total reward (metrics.jsonl); per method the mean
and sample standard deviation over seeds, and the paired per-seed difference to the first method.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from pathlib import Path
from typing import Any

from rl_small import metric_names as M

KEYS = {"train_acc": M.REWARD_ACCURACY, "len": M.ROLLOUT_LEN_MEAN, "reward": M.REWARD_TOTAL}


def run_stats(run: Path) -> dict[str, Any]:
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    out: dict[str, Any] = {"run": str(run), "seed": summary.get("seed"), "steps": len(rows),
                           "after": summary["after"]["accuracy"], "n_eval": summary["after"]["n"],
                           "train_seconds": summary.get("train_seconds")}
    for name, key in KEYS.items():
        vals = [r[key] for r in rows if key in r]
        out[f"{name}_first5"] = statistics.mean(vals[:5])
        out[f"{name}_last5"] = statistics.mean(vals[-5:])
    mem = {k: v for k, v in rows[-1].items() if k in M.MEMORY}
    if mem:
        out["memory_last"] = mem
    return out


def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("groups", nargs="+", metavar="METHOD=GLOB")
    args = ap.parse_args()
    methods: dict[str, list[dict[str, Any]]] = {}
    for g in args.groups:
        name, pattern = g.split("=", 1)
        runs = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "summary.json").exists())
        methods[name] = [run_stats(r) for r in runs if "after" in json.loads((r / "summary.json").read_text())]
    first = next(iter(methods))
    base_by_seed = {r["seed"]: r["after"] for r in methods[first]}
    table = []
    for name, runs in methods.items():
        after_m, after_s = _ms([r["after"] for r in runs])
        diffs = [r["after"] - base_by_seed[r["seed"]] for r in runs if r["seed"] in base_by_seed]
        table.append({"method": name, "seeds": [r["seed"] for r in runs], "after_mean": after_m, "after_sd": after_s,
                      "paired_diff_vs_" + first: diffs,
                      **{f"{k}_last5_mean": _ms([r[f"{k}_last5"] for r in runs])[0] for k in KEYS}})
    Path(args.out + ".json").write_text(json.dumps({"methods": table, "runs": methods}, indent=2))
    lines = ["| method | seed | held-out after | train acc (first 5 → last 5 steps) | length (first 5 → last 5) |",
             "|---|---|---|---|---|"]
    for name, runs in methods.items():
        for r in runs:
            lines.append(f"| {name} | {r['seed']} | {100 * r['after']:.0f}% (n={r['n_eval']}) | "
                         f"{r['train_acc_first5']:.3f} → {r['train_acc_last5']:.3f} | {r['len_first5']:.1f} → "
                         f"{r['len_last5']:.1f} |")
    lines += ["", "| method | held-out after, mean ± sd over seeds | paired difference per seed (points) |",
              "|---|---|---|"]
    for t in table:
        diffs = ", ".join(f"{100 * d:+.0f}" for d in t["paired_diff_vs_" + first])
        lines.append(f"| {t['method']} | {100 * t['after_mean']:.1f}% ± {100 * t['after_sd']:.1f} | {diffs} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201  (a benchmark script prints its table)


if __name__ == "__main__":
    main()
