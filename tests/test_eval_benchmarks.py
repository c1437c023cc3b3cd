"""Benchmark evaluation: summary statistics by hand, grading of each benchmark's answer formats, the runner on
the fake backend (exactly known accuracy), and ``rl-small eval`` end to end on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rewards.math import MathAccuracy
from rl_small.eval.benchmarks import BENCHMARKS, EvalProtocol, load_benchmark_prompts, run_benchmark, summarize
from tests.conftest import SHARED_DATA


def _s(pid: str, correct: bool, extracted: str | None, tokens: int = 10, truncated: bool = False) -> dict:
    return {"id": pid, "correct": correct, "extracted": extracted, "tokens": tokens, "truncated": truncated}


def test_summary_by_hand() -> None:
    # problem a: 1 of 4 correct, majority answer "3" is wrong; problem b: 3 of 4 correct, majority "7" right.
    samples = [_s("a", True, "5"), _s("a", False, "3"), _s("a", False, "3"), _s("a", False, "4", 30, True),
               _s("b", True, "7"), _s("b", True, "7.0"), _s("b", False, "1"), _s("b", True, "7")]
    out = summarize(samples, n=4)
    assert out["pass@1"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    # pass@2: a: 1 - C(3,2)/C(4,2) = 1/2; b: 1 - C(1,2)/C(4,2) = 1
    assert out["pass@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["pass@4"] == 1.0
    assert out["maj@4"] == 0.5  # "7" and "7.0" vote together for b; a's majority "3" is wrong
    assert out["len_mean"] == pytest.approx((7 * 10 + 30) / 8)
    assert out["truncated"] == pytest.approx(1 / 8)


@pytest.mark.parametrize(
    ("benchmark", "completion", "gold", "expected"),
    [
        ("aime24", "\\boxed{25}", "025", True),  # AIME golds are zero-padded
        ("aime24", "\\boxed{025}", "25", True),
        ("aime24", "\\boxed{205}", "025", False),
        ("amc23", "\\boxed{27}", "27.0", True),
        ("amc23", "\\boxed{27.5}", "27.0", False),
        ("math500", "\\boxed{\\frac{1}{2}}", "\\frac12", True),
        ("math500", "\\boxed{0.5}", "\\frac{1}{2}", True),
        ("math500", "\\boxed{(1, 2]}", "(1,2]", True),
        ("math500", "\\boxed{[1, 2]}", "(1,2]", False),
        ("math500", "\\boxed{\\{2, 1\\}}", "\\{1,2\\}", True),
        ("math500", "\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", True),
        ("gsm8k", "The total is #### 1,234", "1234", True),
        ("gsm8k", "\\boxed{-12}", "-12", True),
        ("gsm8k", "\\boxed{12}", "-12", False),
        ("gsm8k", "so she pays $1,200.", "1200", True),
    ],
)
def test_grading_table(benchmark: str, completion: str, gold: str, expected: bool) -> None:
    assert BENCHMARKS[benchmark].grader == "math_accuracy"
    # a generous deadline: this table checks grading, not speed (a loaded machine can take seconds per item)
    assert MathAccuracy(item_timeout_s=60)([completion], answer=[gold]) == [float(expected)]


def _write_gsm8k(path: Path, n: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(n)]
    (path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_runner_on_fake_backend_has_known_accuracy(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from rl_small.rollout.fake import FakeBackend

    data = _write_gsm8k(tmp_path / "gsm8k", 3)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    proto = EvalProtocol(n=2, temperature=0.6, top_p=0.95, max_new_tokens=8)
    prompts = load_benchmark_prompts(BENCHMARKS["gsm8k"], tok, proto, path=str(data))
    assert "Please reason step by step" in prompts[0].text  # r1 style for gsm8k
    # Scripted: problem 0 both right, problem 1 one right, problem 2 none.
    fake = FakeBackend(tok, ["\\boxed{0}", "\\boxed{0}", "\\boxed{2}", "\\boxed{3}", "\\boxed{9}", "\\boxed{9}"])
    report = run_benchmark(BENCHMARKS["gsm8k"], fake, prompts, proto)
    assert report.summary["pass@1"] == pytest.approx(3 / 6)
    assert report.summary["pass@2"] == pytest.approx(2 / 3)
    # maj@2: problem 0 right; problem 1 ties 2 vs 3 and the first ("2", right) wins; problem 2 wrong
    assert report.summary["maj@2"] == pytest.approx(2 / 3)
    assert [s["correct"] for s in report.samples] == [True, True, True, False, False, False]
    assert report.samples[2]["extracted"] == "2" and report.samples[2]["gold"] == "2"
    assert report.summary["mode"] == "sampled" and report.summary["problems"] == 3


def test_eval_cli_end_to_end_on_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = _write_gsm8k(tmp_path / "data" / "gsm8k", 3)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rl_small.cli", "eval", "--model", str(tiny_model_dir), "--benchmarks", "gsm8k",
           "--data-dir", str(data.parent), "--max-new-tokens", "4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "eval" / "summary.json").read_text())
    s = summary["benchmarks"]["gsm8k"]
    assert (s["problems"], s["mode"], s["n"], s["max_new_tokens"]) == (3, "greedy", 1, 4)
    lines = (out / "eval" / "gsm8k.jsonl").read_text().splitlines()
    assert len(lines) == 3 and {"prompt", "completion", "extracted", "gold", "correct", "tokens"} <= json.loads(lines[0]).keys()
    assert 0 < s["len_mean"] <= 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--benchmarks", "gsm9k"], "unknown benchmark(s) ['gsm9k']"),
        (["--benchmarks", "gsm8k", "--data-dir", "/nonexistent"], "/nonexistent/gsm8k"),
        (["--n", "4", "--temperature", "0"], "identical samples"),
    ],
)
def test_eval_cli_errors_name_the_bad_value(tiny_model_dir: Path, args: list[str], message: str, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "rl_small.cli", "eval", "--model", str(tiny_model_dir), "--out", str(tmp_path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-1500:]


@pytest.mark.skipif(not (SHARED_DATA / "aime24").exists(), reason="../shared/data is absent")
@pytest.mark.parametrize(("name", "count"), [("gsm8k", 1319), ("math500", 500), ("aime24", 30), ("humaneval", 164)])
def test_local_benchmark_sizes(tiny_model_dir: Path, name: str, count: int) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = load_benchmark_prompts(BENCHMARKS[name], tok, EvalProtocol(), data_dir=str(SHARED_DATA))
    assert len(prompts) == count == BENCHMARKS[name].size


def test_in_training_eval_is_logged_every_n_steps(tiny_overrides: list[str], tmp_path: Path) -> None:
    from rl_small.config import load_recipe
    from rl_small.trainer import Trainer

    _write_gsm8k(tmp_path / "data" / "gsm8k", 5)
    cfg = load_recipe(None, tiny_overrides + [
        "train.steps=2", "train.eval_every=2", "train.eval_benchmarks=[gsm8k]", "train.eval_limit=3",
        f"train.eval_data_dir={tmp_path / 'data'}", "train.eval_max_new_tokens=4",
        "rewards=[{name: 'tests.helpers:token_reward'}]",
    ])
    tr = Trainer(cfg, tmp_path / "run")
    assert len(tr.periodic_eval.prompts["gsm8k"]) == 3
    tr.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ["eval/gsm8k/pass@1" in r for r in rows] == [False, True]
    assert 0 <= rows[1]["eval/gsm8k/pass@1"] <= 1 and 0 < rows[1]["eval/gsm8k/len_mean"] <= 4
    from rl_small.config import RecipeError

    with pytest.raises(RecipeError, match="gsm9k"):
        Trainer(load_recipe(None, tiny_overrides + ["train.eval_every=1", "train.eval_benchmarks=[gsm9k]"]),
                tmp_path / "bad")


def test_heldout_curve_evaluates_the_before_after_problems(tiny_overrides: list[str], tmp_path: Path) -> None:
    """``train.eval_benchmarks: [heldout]``: the run's own held-out problems every N steps; at the last step the
    policy is the one the after-training evaluation sees, greedily on the same problems: the same numbers."""
    import argparse

    from rl_small.config import RecipeError
    from rl_small.train import run

    base = tiny_overrides + ["train.steps=2", "train.eval_every=1", "train.eval_benchmarks=[heldout]",
                             "train.eval_samples=6", f"train.output_dir={tmp_path}"]
    summary = run(argparse.Namespace(recipe=None, resume=None, overrides=base + [
        "train.eval_after=true", "train.run_name=curve"]))
    rows = [json.loads(x) for x in (tmp_path / "curve" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/heldout/pass@1" in r] == [1, 2]
    assert summary["after"]["n"] == 6
    assert rows[-1]["eval/heldout/pass@1"] == summary["after"]["accuracy"]
    assert rows[-1]["eval/heldout/len_mean"] == pytest.approx(summary["after"]["len_mean"])
    # without the before/after evaluations the held-out problems are still loaded for the curve
    run(argparse.Namespace(recipe=None, resume=None, overrides=base + ["train.run_name=only", "train.steps=1"]))
    only = [json.loads(x) for x in (tmp_path / "only" / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= only[0]["eval/heldout/pass@1"] <= 1
    with pytest.raises(RecipeError, match="'heldout' needs held-out problems"):
        run(argparse.Namespace(recipe=None, resume=None, overrides=base + ["train.run_name=none",
                                                                         "train.eval_samples=0"]))


class _Counting:
    """A fake backend that counts the problems it is asked for and fails on call number ``fail_on``."""

    def __init__(self, inner: object, fail_on: int | None = None) -> None:
        self.inner, self.fail_on, self.calls, self.problems = inner, fail_on, 0, 0

    def generate(self, prompts: list, spec: object) -> list:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("server died")
        self.problems += len(prompts)
        return self.inner.generate(prompts, spec)


def test_interrupted_eval_resumes_where_it_stopped(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from rl_small.eval.run import evaluate_into
    from rl_small.rollout.fake import FakeBackend

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    proto = EvalProtocol(max_new_tokens=8)
    prompts = load_benchmark_prompts(BENCHMARKS["gsm8k"], tok, proto, path=str(_write_gsm8k(tmp_path / "d", 5)))
    bench, meta = BENCHMARKS["gsm8k"], {"model": "m", "adapter": None}

    def backend(fail_on: int | None = None) -> _Counting:
        return _Counting(FakeBackend(tok, ["\\boxed{4}"]), fail_on)  # right only for problem 2 (gold 4)

    first = backend(fail_on=2)
    with pytest.raises(RuntimeError, match="server died"):
        evaluate_into(tmp_path, bench, first, prompts, proto, meta, chunk=2)
    saved = [json.loads(x) for x in (tmp_path / "gsm8k.jsonl").read_text().splitlines()]
    assert [s["id"] for s in saved] == [p.id for p in prompts[:2]]  # the first chunk survived
    with (tmp_path / "gsm8k.jsonl").open("a") as f:
        f.write('{"id": "torn')  # a write cut by the kill: dropped on resume
    again = backend()
    report = evaluate_into(tmp_path, bench, again, prompts, proto, meta, chunk=2)
    assert again.problems == 3 and report.summary["resumed_problems"] == 2
    first_chunk = sum(json.loads(x)["gen_seconds"] for x in (tmp_path / "gsm8k.jsonl").read_text().splitlines()[:2])
    assert report.summary["generate_seconds_all_runs"] == pytest.approx(report.summary["generate_seconds"] + first_chunk)
    assert first_chunk > 0
    assert report.summary["pass@1"] == pytest.approx(1 / 5) and report.summary["problems"] == 5
    lines = [json.loads(x) for x in (tmp_path / "gsm8k.jsonl").read_text().splitlines()]
    assert [s["id"] for s in lines] == [p.id for p in prompts] and [s["correct"] for s in lines].count(True) == 1
    other = backend()  # another protocol: nothing is reused
    evaluate_into(tmp_path, bench, other, prompts, EvalProtocol(max_new_tokens=6), meta, chunk=2)
    assert other.problems == 5


def test_evaluating_another_benchmark_into_a_folder_keeps_the_earlier_rows(tmp_path: Path) -> None:
    from rl_small.eval.run import _earlier_results

    meta = {"model": "m", "adapter": "/a", "adapter_files": [["adapter_model.safetensors", 10, 1]]}
    rows = {"gsm8k": {"pass@1": 0.25}, "math500": {"pass@1": 0.5}, "aime24": {"pass@1": 0.0}}
    (tmp_path / "summary.json").write_text(json.dumps({"model": "m", "benchmarks": rows}))
    for name in rows:
        (tmp_path / f"{name}.jsonl").write_text("{}\n")
        (tmp_path / f"{name}.meta.json").write_text(json.dumps(meta | {"protocol": {"n": 1}}))
    (tmp_path / "aime24.jsonl").unlink()  # its samples are gone: its row is not kept
    assert _earlier_results(tmp_path, meta, skip=["gsm8k"]) == {"math500": {"pass@1": 0.5}}
    retrained = meta | {"adapter_files": [["adapter_model.safetensors", 10, 2]]}
    assert _earlier_results(tmp_path, retrained, skip=["gsm8k"]) == {}
    assert _earlier_results(tmp_path / "nowhere", meta, skip=[]) == {}
