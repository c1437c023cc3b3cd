"""Generic benchmarks (``rl-small eval --benchmark name=path,question=..,answer=..``) on files shaped as public
datasets ship them, through the same runner, grading, summary and resume code as the built-ins; progress and
chunked saving; data checked before any model loads."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rl_small.eval.benchmarks import parse_benchmark_spec

# Hothan/OlympiadBench (OE_TO_* configs): `final_answer` is a list of LaTeX strings, `solution` a list too.
OLYMPIAD_ROWS = [
    {"id": 1003, "question": "Estimate the total energy released by the supernova, in joules.",
     "solution": ["The energy is $E=M c^{2} \\approx 4.5 \\times 10^{33}$ J."], "final_answer": ["$4.5 \\times 10^{33}$"],
     "context": None, "image_1": None, "modality": "Text-only", "difficulty": "Competition",
     "is_multiple_answer": False, "unit": "J", "answer_type": "Numerical", "error": "1e32",
     "question_type": "Open-ended", "subfield": "Modern Physics", "subject": "Physics", "language": "English"},
    {"id": 2231, "question": "Find the smallest positive integer $n$ such that $n^2 > 24$.",
     "solution": ["Since $4^2=16$ and $5^2=25$, $n=5$."], "final_answer": ["$5$"],
     "context": None, "image_1": None, "modality": "Text-only", "difficulty": "Competition",
     "is_multiple_answer": False, "unit": None, "answer_type": "Numerical", "error": None,
     "question_type": "Open-ended", "subfield": "Number Theory", "subject": "Math", "language": "English"},
]
# Minerva math (Qwen2.5-Math evaluation/data/minerva_math/test.jsonl): `problem` and a worked `solution` whose
# final answer is the last \boxed{}.
MINERVA_ROWS = [
    {"problem": "A star has apparent magnitude 10 and distance modulus 2.5. What is its absolute magnitude?",
     "solution": "$M = m - \\mu = 10 - 2.5 = \\boxed{7.5}$.", "type": "Introduction to Astronomy (8.282J Spring 2006)",
     "idx": 0},
    {"problem": "How many moles are in 3 liters of a 1 M solution?", "solution": "Moles: \\boxed{3}.",
     "type": "Introduction to Solid State Chemistry (3.091 Fall 2010)", "idx": 1},
    {"problem": "What is the period, in seconds, of a wave of angular frequency 1 rad/s?",
     "solution": "$T = \\frac{2\\pi}{\\omega} = \\boxed{2 \\pi}$", "type": "Physics I", "idx": 2},
]


def write_files(tmp: Path) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp.mkdir(parents=True, exist_ok=True)
    olympiad = tmp / "OE_TO_maths_en_COMP.parquet"
    pq.write_table(pa.Table.from_pylist(OLYMPIAD_ROWS), olympiad)
    minerva = tmp / "minerva_math" / "test.jsonl"
    minerva.parent.mkdir()
    minerva.write_text("".join(json.dumps(r) + "\n" for r in MINERVA_ROWS))
    return olympiad, minerva


class Scripted:
    """A fake backend over a real tokenizer: counts problems, raises KeyboardInterrupt on call ``stop_on``."""

    def __init__(self, tok: Any, completions: list[str], stop_on: int | None = None) -> None:
        from rl_small.rollout.fake import FakeBackend

        self.inner, self.stop_on, self.calls, self.problems = FakeBackend(tok, completions), stop_on, 0, 0

    def generate(self, prompts: list, spec: object) -> list:
        self.calls += 1
        if self.calls == self.stop_on:
            raise KeyboardInterrupt
        self.problems += len(prompts)
        return self.inner.generate(prompts, spec)

    def close(self) -> None:
        pass


def eval_args(*argv: str) -> Any:
    import argparse

    from rl_small.eval.run import add_eval_args

    p = argparse.ArgumentParser()
    add_eval_args(p)
    return p.parse_args(["--model", "m", "--backend", "hf", *argv])


def test_spec_parsing_and_presets() -> None:
    b = parse_benchmark_spec("olympiad=data/ob.parquet, question=question, answer=final_answer, grader=math, style=qwen_math")
    assert (b.name, b.path, b.question, b.answer, b.grader, b.style, b.split) == (
        "olympiad", "data/ob.parquet", "question", "final_answer", "math_accuracy", "qwen_math", "test")
    assert parse_benchmark_spec("g=f.jsonl,question=q,answer=a,grader=gsm8k").gold == "gsm8k"
    preset = parse_benchmark_spec("math500=/d/m.jsonl")  # a built-in read from a file
    assert preset.task == "math500" and preset.path == "/d/m.jsonl" and preset.question is None
    with pytest.raises(ValueError, match="answer=FIELD"):
        parse_benchmark_spec("x=f.jsonl,question=q")
    with pytest.raises(ValueError, match="unknown option 'answr=a'"):
        parse_benchmark_spec("x=f.jsonl,question=q,answr=a")


@pytest.mark.parametrize(("value", "kind", "gold"), [
    (["$4.5 \\times 10^{33}$", "$4.4 \\times 10^{33}$"], "math", "$4.5 \\times 10^{33}$"),  # a list: the first
    ("so $x = \\boxed{\\frac{1}{2}}$.", "math", "\\frac{1}{2}"),  # a worked solution: its last boxed
    ("12", "math", "12"),
    ("3 + 4 = 7\n#### 7", "gsm8k", "7"),
    ("def f():\n    return '\\boxed{1}'", "raw", "def f():\n    return '\\boxed{1}'"),  # e.g. code: as it is
    ([], "math", None),
])
def test_gold_is_read_from_any_answer_column(value: Any, kind: str, gold: str | None) -> None:
    from rl_small.data.registry import gold_text

    assert gold_text(value, kind) == gold


def test_olympiad_and_minerva_files_through_eval_and_resume(tiny_model_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    import rl_small.eval.run as run_mod

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    olympiad, minerva = write_files(tmp_path / "data")
    # olympiad: right, wrong (gold 5); minerva: right (7.5), wrong (3), right (2 pi)
    texts = ["\\boxed{4.5 \\times 10^{33}}", "\\boxed{6}", "\\boxed{7.5}", "\\boxed{0}", "\\boxed{2\\pi}"]
    backends: list[Scripted] = []

    def fake_backend(kind: str, model: str, adapter: Any, args: Any, out: Path) -> tuple[Scripted, Any]:
        backends.append(Scripted(tok, texts))
        return backends[-1], tok

    monkeypatch.setattr(run_mod, "_backend", fake_backend)
    args = eval_args("--benchmark", f"olympiad={olympiad},question=question,answer=final_answer",
                     "--benchmark", f"minerva={minerva.parent},question=problem,answer=solution,style=qwen_math",
                     "--out", str(tmp_path / "out"))
    summary = run_mod.run_eval(args)
    ob, mv = summary["benchmarks"]["olympiad"], summary["benchmarks"]["minerva"]
    assert (ob["problems"], ob["pass@1"]) == (2, 0.5)
    assert (mv["problems"], mv["pass@1"], mv["style"]) == (3, pytest.approx(2 / 3), "qwen_math")
    rows = [json.loads(x) for x in (tmp_path / "out" / "eval" / "olympiad.jsonl").read_text().splitlines()]
    assert [(r["id"], r["gold"], r["correct"]) for r in rows] == [
        ("1003", "$4.5 \\times 10^{33}$", True), ("2231", "$5$", False)]
    mrows = [json.loads(x) for x in (tmp_path / "out" / "eval" / "minerva.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in mrows] == ["7.5", "3", "2 \\pi"] and mrows[0]["extracted"] == "7.5"
    again = run_mod.run_eval(args)  # same folder, model and protocol: everything is resumed, nothing generated
    assert backends[-1].problems == 0 and again["benchmarks"]["minerva"]["resumed_problems"] == 3
    assert again["benchmarks"]["olympiad"]["pass@1"] == 0.5


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def eval_log() -> Any:
    handler, logger = _Lines(), logging.getLogger("rl_small.eval")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_stopped_eval_keeps_each_finished_chunk_and_resumes(tiny_model_dir: Path, tmp_path: Path, eval_log: list[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    import rl_small.eval.run as run_mod

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"problem": f"What is {i} times 2?", "solution": f"$2 \\cdot {i} = \\boxed{{{2 * i}}}$"} for i in range(5)]
    (tmp_path / "five.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    backends: list[Scripted] = []
    stop_on = [2, None]  # the first run is stopped (Ctrl-C) on its second generation call

    def fake_backend(kind: str, model: str, adapter: Any, args: Any, out: Path) -> tuple[Scripted, Any]:
        backends.append(Scripted(tok, ["\\boxed{0}", "\\boxed{5}"], stop_on.pop(0)))
        return backends[-1], tok

    monkeypatch.setattr(run_mod, "_backend", fake_backend)
    # no --chunk: the default is the requests in flight (hf: --batch-size / n = 2 problems), not 256
    args = eval_args("--benchmark", f"five={tmp_path / 'five.jsonl'},question=problem,answer=solution",
                     "--batch-size", "2", "--out", str(tmp_path / "out"))
    with pytest.raises(KeyboardInterrupt):
        run_mod.run_eval(args)
    saved = [json.loads(x) for x in (tmp_path / "out" / "eval" / "five.jsonl").read_text().splitlines()]
    assert [(s["gold"], s["correct"]) for s in saved] == [("0", True), ("2", False)]  # the first chunk is on disk
    progress = [x for x in eval_log if x.startswith("five: 2/5")]
    assert progress[0].startswith("five: 2/5 problems, pass@1 so far 50.0%, ") and " tok/s, ETA " in progress[0]
    assert any("rerun the same command to resume" in x for x in eval_log)
    summary = run_mod.run_eval(args)
    assert backends[-1].problems == 3 and backends[-1].calls == 2  # chunks of 2: problems 3-4, then 5
    s = summary["benchmarks"]["five"]
    assert (s["problems"], s["resumed_problems"]) == (5, 2)
    lines = [json.loads(x) for x in (tmp_path / "out" / "eval" / "five.jsonl").read_text().splitlines()]
    assert [x["gold"] for x in lines] == ["0", "2", "4", "6", "8"]
    assert s["pass@1"] == pytest.approx(sum(x["correct"] for x in lines) / 5)
    assert [x for x in eval_log if x.startswith("five: 5/5 problems")], eval_log


def test_held_out_evaluation_logs_progress_per_chunk(tiny_model_dir: Path, eval_log: list[str]) -> None:
    from transformers import AutoTokenizer

    from rl_small.eval import evaluate
    from rl_small.rollout.fake import FakeBackend
    from rl_small.types import Prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [Prompt(id=str(i), text=f"{i}+{i}=", answer=str(2 * i), columns={"answer": str(2 * i)}) for i in range(5)]
    from rewards.math import MathAccuracy

    result = evaluate(FakeBackend(tok, ["\\boxed{0}", "\\boxed{2}", "\\boxed{9}"]), prompts, MathAccuracy(), 8,
                      "held-out before training", chunk=2)
    assert result.accuracy == pytest.approx(2 / 5) and result.n == 5
    lines = [x for x in eval_log if x.startswith("held-out before training: ")]
    assert [x.split(", pass@1")[0] for x in lines] == [f"held-out before training: {k}/5 problems" for k in (2, 4, 5)]
    assert "pass@1 so far 100.0%" in lines[0] and "pass@1 so far 40.0%" in lines[2] and "ETA" in lines[2]


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """No network and an empty hub cache: the hub cannot give any dataset."""
    return {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.mark.parametrize(("argv", "expected"), [
    (["eval", "--benchmarks", "gsm8k,math500"],  # the model does not exist: the data check comes before it loads
     "Pass --data-dir DIR holding gsm8k/test.jsonl (or .json, .parquet), or --benchmark gsm8k=PATH,"),
    (["eval", "--benchmark", ("ob=Hothan/OlympiadBench,question=question,answer=final_answer,"
                              "config=OE_TO_maths_en_COMP,split=train")],
     "hub dataset 'Hothan/OlympiadBench' split 'train' is not available"),
    (["train", "train.eval_every=1", "train.eval_benchmarks=[math500]", "train.output_dir=runs"],
     "Pass train.eval_data_dir=DIR holding math500/test.jsonl"),
    (["train", "data.task=gsm8k", "data.path=train-only", "data.eval_split=test", "train.output_dir=runs"],
     "'test' in 'train-only'"),
])
def test_offline_without_data_is_one_line_before_any_model_or_folder(tmp_path: Path, argv: list[str],
                                                                     expected: str) -> None:
    (tmp_path / "train-only").mkdir()
    (tmp_path / "train-only" / "train.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2\n#### 2"}) + "\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    model = ["--model", "/nonexistent-model"] if argv[0] == "eval" else ["model.name=/nonexistent-model"]
    proc = subprocess.run([sys.executable, "-m", "rl_small.cli", *argv, *model], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, check=False, env=_offline_env(tmp_path))
    assert proc.returncode != 0 and expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "nonexistent-model" not in proc.stderr
    assert len([x for x in proc.stderr.splitlines() if "error" in x]) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf-home") == before  # no runs/ folder left


def test_generic_benchmark_end_to_end_on_the_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    _, minerva = write_files(tmp_path / "data")
    cmd = [sys.executable, "-m", "rl_small.cli", "eval", "--model", str(tiny_model_dir), "--max-new-tokens", "4",
           "--benchmark", f"minerva={minerva.parent},question=problem,answer=solution", "--batch-size", "2",
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((tmp_path / "out" / "eval" / "summary.json").read_text())["benchmarks"]["minerva"]
    assert (s["problems"], s["max_new_tokens"], s["n"]) == (3, 4, 1) and 0 < s["len_mean"] <= 4
    rows = [json.loads(x) for x in (tmp_path / "out" / "eval" / "minerva.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in rows] == ["7.5", "3", "2 \\pi"]
