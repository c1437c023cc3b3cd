"""Compare finished training runs step by step: a markdown table and a JSON file from their metrics.jsonl and
summary.json.

    python bench/ppo_vs_grpo.py runs/bench-grpo runs/bench-ppo [--steps 1 5 10 15 20] [--out bench/results/x]

Reads only the run directories (no model, no torch). Per run: held-out accuracy before/after (summary.json),
then the chosen steps' reward, accuracy, completion length, KL to the reference, entropy, ratio-clip and
truncation fractions, step time, and a smoothed reward (mean over the first and last five steps).
The trainer logs ``policy/entropy`` every ``algo.entropy_log_every`` steps (default 5; every step when
``algo.entropy_coef > 0``): train the compared runs with ``algo.entropy_log_every=1`` to fill that column.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rl_small import metric_names as M

COLUMNS = [
    (M.REWARD_TOTAL, "reward", 3),
    (M.REWARD_ACCURACY, "train acc", 3),
    (M.ROLLOUT_LEN_MEAN, "len", 1),
    (M.POLICY_KL, "KL (k3)", 4),
    (M.POLICY_ENTROPY, "entropy", 3),
    (M.LOSS_CLIP_FRAC, "ratio clip frac", 4),
    (M.ROLLOUT_TRUNCATED_FRAC, "truncated", 3),
    (M.LOSS_VALUE, "value loss", 4),
    (M.TIME_STEP, "step s", 1),
]


def load_run(run_dir: Path) -> dict[str, Any]:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    return {"dir": str(run_dir), "metrics": metrics, "summary": summary, "config": config}


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else None


def table(name: str, run: dict[str, Any], steps: list[int]) -> tuple[list[str], dict[str, Any]]:
    by_step = {r["step"]: r for r in run["metrics"]}
    cols = [c for c in COLUMNS if any(c[0] in r for r in run["metrics"])]
    lines = [f"| {name} step | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    rows = {}
    for s in steps:
        r = by_step.get(s)
        if r is None:
            continue
        rows[s] = {c[0]: r.get(c[0]) for c in cols}
        lines.append(f"| {s} | " + " | ".join(f"{r[c[0]]:.{c[2]}f}" if c[0] in r else "" for c in cols) + " |")
    ordered = [by_step[s] for s in sorted(by_step)]
    smooth = {"first5": {c[0]: _mean(ordered[:5], c[0]) for c in cols},
              "last5": {c[0]: _mean(ordered[-5:], c[0]) for c in cols}}
    for label, vals in (("mean 1-5", smooth["first5"]), (f"mean {max(len(ordered) - 4, 1)}-{len(ordered)}",
                                                         smooth["last5"])):
        lines.append(f"| {label} | " + " | ".join(
            f"{vals[c[0]]:.{c[2]}f}" if vals[c[0]] is not None else "" for c in cols) + " |")
    curve = {r["step"]: {c[0]: r.get(c[0]) for c in cols} for r in ordered}
    return lines, {"steps": rows, "smoothed": smooth, "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10, 15, 20])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "ppo_vs_grpo")
    ap.add_argument("--note", default="", help="markdown put above the tables (how the runs were made)")
    args = ap.parse_args()
    out_md = ["| run | held-out acc before | after | change (points) | mean len after | train s |",
              "|---|---|---|---|---|---|"]
    data: dict[str, Any] = {}
    tables: list[str] = []
    for run_dir in args.runs:
        run = load_run(run_dir)
        name = run_dir.name
        s = run["summary"]
        before, after = s.get("before", {}), s.get("after", {})
        nan = float("nan")
        change = 100 * (after["accuracy"] - before["accuracy"]) if before and after else nan
        out_md.append(
            f"| {name} | {100 * before.get('accuracy', nan):.1f}% (n={before.get('n', '?')}) | "
            f"{100 * after.get('accuracy', nan):.1f}% | {change:+.1f} | {after.get('len_mean', nan):.1f} | "
            f"{s.get('train_seconds', nan):.0f} |"
        )
        lines, per = table(name, run, args.steps)
        tables += ["", *lines]
        data[name] = {"summary": s, "config": run["config"], **per}
    text = (args.note.strip() + "\n\n" if args.note.strip() else "") + "\n".join(out_md + tables) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"note": args.note, "runs": data}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
