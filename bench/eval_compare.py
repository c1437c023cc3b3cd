"""Compare two ``rl-small eval`` output folders (e.g. a base model and a trained adapter) benchmark by benchmark:
each one's own result, and both scored on the problems that both have (a paired comparison that stays fair when
one evaluation was cut short and resumed later), with the problems only one of them solved.

    python bench/eval_compare.py runs/eval-base runs/eval-adapter --name eval_smollm2_135m
    # table on the terminal; bench/results/<name>.json

How correct answers were found is counted too: by a \\boxed{} answer or by the last-number fallback of the
``auto`` extractor (rewards.math.extract_answer), which on a looping small model mostly finds a number by chance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import save_results


def load(folder: Path) -> dict[str, Any]:
    """summary.json and the samples of each benchmark of an eval folder (``<out>`` or ``<out>/eval``)."""
    ev = folder / "eval" if (folder / "eval" / "summary.json").exists() else folder
    if not (ev / "summary.json").exists():
        raise FileNotFoundError(f"{str(folder)!r}: no summary.json (not an rl-small eval output folder)")
    summary = json.loads((ev / "summary.json").read_text())
    samples = {}
    for f in sorted(ev.glob("*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        samples[f.stem] = {r["id"]: r for r in rows if r.get("sample", 0) == 0}  # greedy: one sample a problem
    return {"summary": summary, "samples": samples}


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in sorted(set(a["samples"]) & set(b["samples"])):
        sa, sb = a["samples"][name], b["samples"][name]
        common = [i for i in sa if i in sb]
        row: dict[str, Any] = {"a": _own(sa, a["summary"], name), "b": _own(sb, b["summary"], name),
                               "paired_problems": len(common)}
        if common:
            row["paired_a"] = sum(sa[i]["correct"] for i in common) / len(common)
            row["paired_b"] = sum(sb[i]["correct"] for i in common) / len(common)
            row["only_a"] = sum(sa[i]["correct"] and not sb[i]["correct"] for i in common)
            row["only_b"] = sum(sb[i]["correct"] and not sa[i]["correct"] for i in common)
        out[name] = row
    return out


def _own(samples: dict[str, dict[str, Any]], summary: dict[str, Any], name: str) -> dict[str, Any]:
    rows = list(samples.values())
    right = [r for r in rows if r["correct"]]
    s = summary.get("benchmarks", {}).get(name, {})
    return {"problems": len(rows), "complete": s.get("problems") == len(rows), "accuracy": len(right) / max(len(rows), 1),
            "correct": len(right), "correct_boxed": sum("\\boxed" in r["completion"] for r in right),
            "boxed": sum("\\boxed" in r["completion"] for r in rows) / max(len(rows), 1),
            "len_mean": sum(r["tokens"] for r in rows) / max(len(rows), 1),
            "truncated": sum(r["truncated"] for r in rows) / max(len(rows), 1),
            "seconds_last_invocation": s.get("seconds"),  # a resumed evaluation timed only its last part
            "generate_seconds_all_runs": s.get("generate_seconds_all_runs")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="first eval folder (e.g. the base model)")
    p.add_argument("b", type=Path, help="second eval folder (e.g. the trained adapter)")
    p.add_argument("--name", default="eval_compare", help="results file name under bench/results/")
    args = p.parse_args()
    a, b = load(args.a), load(args.b)
    rows = compare(a, b)
    print(f"a = {args.a}\nb = {args.b}")
    print("| benchmark | a: problems, acc (boxed hits) | b: problems, acc (boxed hits) | paired n | a | b | only a | only b |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        own = [f"{x['problems']}, {100 * x['accuracy']:.2f}% ({x['correct_boxed']}/{x['correct']})" for x in (r["a"], r["b"])]
        paired = (f"{r['paired_problems']} | {100 * r['paired_a']:.2f}% | {100 * r['paired_b']:.2f}% | {r['only_a']} | "
                  f"{r['only_b']}") if r["paired_problems"] else "0 | | | |"
        print(f"| {name} | {own[0]} | {own[1]} | {paired} |")
    payload = {"a": {"folder": str(args.a), "model": a["summary"].get("model"), "adapter": a["summary"].get("adapter")},
               "b": {"folder": str(args.b), "model": b["summary"].get("model"), "adapter": b["summary"].get("adapter")},
               "benchmarks": rows}
    print(f"results: {save_results(args.name, payload)}")


if __name__ == "__main__":
    main()
