"""Evaluation benchmarks and the runner behind ``rl-small eval`` (protocols: docs/METHODS.md §7).

    bench = BENCHMARKS["math500"]
    report = run_benchmark(bench, backend, tokenizer, EvalProtocol(n=4, temperature=0.6, top_p=0.95))
    report.summary   # {"pass@1": ..., "pass@4": ..., "maj@4": ..., "len_mean": ..., "truncated": ...}
    report.samples   # one record per sample: prompt, completion, extracted, gold, correct, tokens

A benchmark is a data-registry task + split + grader + default prompt style. Data comes from the HF hub, or
from ``<data_dir>/<local>`` (the layout ``rl-small data download`` writes, e.g. ``data/gsm8k/test.jsonl``), or from an explicit path. A generic benchmark
(``parse_benchmark_spec``) names any file or hub dataset and its question and answer columns.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl_small.eval.metrics import majority_vote, pass_at_k
from rl_small.eval.progress import EvalProgress
from rl_small.rollout.base import RolloutBackend, SamplingSpec
from rl_small.types import batch_columns


@dataclass(frozen=True)
class Benchmark:
    """One evaluation set: which task/split, how to grade, which prompt style and length by default.

    A built-in benchmark names a registry task; a generic one (``--benchmark name=path,question=..,answer=..``)
    names its file or hub dataset (``path``) and the columns holding the question and the gold answer."""

    name: str
    task: str
    split: str
    local: str  # path under --data-dir (file or folder)
    style: str = "r1"
    grader: str = "math_accuracy"
    max_new_tokens: int = 1024
    size: int | None = None  # documented number of problems
    path: str | None = None  # generic: a local file/folder or a hub dataset id
    question: str | None = None  # generic: the question column
    answer: str | None = None  # generic: the gold column (a list: its first element; a solution: its last \boxed{})
    gold: str = "math"  # generic: how the gold is read ("gsm8k": after the last ####)
    config: str | None = None  # generic, hub: the dataset's config (subset) name


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("gsm8k", "gsm8k", "test", "gsm8k", size=1319),
        Benchmark("math500", "math500", "test", "math500", size=500),
        Benchmark("aime24", "aime24", "test", "aime24", size=30),
        Benchmark("aime25", "aime25", "test", "aime25", size=30),
        Benchmark("amc23", "amc23", "test", "amc23", size=40),
        Benchmark("humaneval", "humaneval", "test", "humaneval/HumanEval.jsonl.gz", "code", "code_execution", 512, 164),
        Benchmark("mbpp", "mbpp", "test", "mbpp/sanitized-mbpp.json", "code", "code_execution", 512),
    )
}


# grader=... of a generic benchmark: a short name, or any reward name (rewards registry)
GRADERS = {"math": ("math_accuracy", "math"), "gsm8k": ("math_accuracy", "gsm8k"), "code": ("code_execution", "raw")}
SPEC_KEYS = ("question", "answer", "grader", "style", "split", "max_new_tokens", "config")


def parse_benchmark_spec(text: str) -> Benchmark:
    """``name=path,question=FIELD,answer=FIELD[,grader=math|gsm8k|code|<reward>][,style=S][,split=S]
    [,max_new_tokens=N][,config=SUBSET]``: a generic benchmark over any jsonl / json / parquet file, folder
    (``<split>.jsonl``) or hub dataset id (``config``: its subset). A built-in name with only a path (``math500=data/math500.jsonl``) is that preset read
    from the path."""
    head, *rest = [x.strip() for x in text.split(",") if x.strip()]
    if "=" not in head:
        raise ValueError(f"--benchmark expects name=path,question=FIELD,answer=FIELD[,...], got {text!r}")
    name, path = (x.strip() for x in head.split("=", 1))
    if not name.replace("_", "").replace("-", "").replace(".", "").isalnum() or not path:
        raise ValueError(f"--benchmark {text!r}: the name (letters, digits, _ - .) and the path must be given")
    opts: dict[str, str] = {}
    for item in rest:
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or key not in SPEC_KEYS:
            raise ValueError(f"--benchmark {name}: unknown option {item!r}; known: {', '.join(SPEC_KEYS)}")
        opts[key] = value
    if name in BENCHMARKS and not {"question", "answer"} & opts.keys():
        return dataclasses.replace(BENCHMARKS[name], path=path, **{k: v for k, v in opts.items() if k in ("style", "split")})
    missing = [k for k in ("question", "answer") if not opts.get(k)]
    if missing:
        raise ValueError(f"--benchmark {name}: give {' and '.join(f'{k}=FIELD' for k in missing)} (the column(s) "
                         f"of {path!r} holding the {' and the '.join(missing)})")
    grader, gold = GRADERS.get(opts.get("grader", "math"), (opts.get("grader", ""), "raw"))
    return Benchmark(name, task=name, split=opts.get("split", "test"), local=name, style=opts.get("style", "r1"),
                     grader=grader, max_new_tokens=int(opts.get("max_new_tokens", 1024)), path=path,
                     question=opts["question"], answer=opts["answer"], gold=gold, config=opts.get("config"))


@dataclass(frozen=True)
class EvalProtocol:
    """greedy: n=1, T=0. sampled: pass@1 averaged over n samples at T=0.6, top-p 0.95 (DeepSeek-R1 style)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # default: the benchmark's
    style: str | None = None  # default: the benchmark's
    limit: int | None = None

    @property
    def mode(self) -> str:
        return "greedy" if self.temperature == 0 and self.n == 1 else "sampled"


@dataclass
class BenchmarkReport:
    name: str
    summary: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)


def load_benchmark_prompts(
    bench: Benchmark, tokenizer: Any, protocol: EvalProtocol, data_dir: str | None = None, path: str | None = None
) -> list[Any]:
    """Rows of the benchmark rendered with its prompt style (or the protocol's) and the chat template."""
    return render_benchmark(load_benchmark_rows(bench, protocol, data_dir, path), tokenizer)


def load_benchmark_rows(
    bench: Benchmark, protocol: EvalProtocol, data_dir: str | None = None, path: str | None = None,
    data_flag: str = "--data-dir DIR",
) -> tuple[list[dict[str, Any]], Any]:
    """The benchmark's rows and the data config that renders them; needs no model or tokenizer, so that data
    that cannot be found stops an evaluation before a model loads (a DataError saying what to pass: ``data_flag``
    with the files it must hold)."""
    from rl_small.config import DataConfig
    from rl_small.data.files import DataError
    from rl_small.data.registry import TASKS, Task, field_item, hub_like, rows_of_task
    from rl_small.data.templates import PROMPT_STYLES

    style = protocol.style or bench.style
    if style not in PROMPT_STYLES:
        raise KeyError(f"unknown prompt style {style!r}; known: {sorted(PROMPT_STYLES)}")
    template, system = PROMPT_STYLES[style]
    where = path or bench.path or (str(Path(data_dir) / bench.local) if data_dir else None)
    hub_id = None
    if bench.question is not None and where is not None and hub_like(where):
        where, hub_id = None, bench.path  # a generic benchmark named by its hub dataset id
    if where is not None and not Path(where).exists():
        raise FileNotFoundError(f"benchmark {bench.name!r}: local data {where!r} does not exist")
    if bench.question is not None:
        task = Task(bench.name, hub_id, bench.config, field_item(bench.question, bench.answer or "", bench.gold))
    else:
        task = TASKS[bench.task]
    cfg = DataConfig(task=bench.task, path=where, template=template, system_prompt=system)
    try:
        rows, _ = rows_of_task(task, cfg, bench.split, limit=protocol.limit)
    except DataError as err:
        if where is not None:
            raise
        if bench.question is not None:  # a generic benchmark named by its hub id
            raise DataError(f"benchmark {bench.name!r}: {err}. Pass a local copy: --benchmark {bench.name}=PATH,"
                            f"question={bench.question},answer={bench.answer}") from None
        files = bench.local if "." in bench.local else f"{bench.local}/{bench.split}.jsonl (or .json, .parquet)"
        generic = f", or --benchmark {bench.name}=PATH,question=FIELD,answer=FIELD" if data_flag[:2] == "--" else ""
        raise DataError(f"benchmark {bench.name!r}: no local data and {err}. Pass {data_flag} holding "
                        f"{files}{generic}") from None
    return rows, cfg


def render_benchmark(loaded: tuple[list[dict[str, Any]], Any], tokenizer: Any) -> list[Any]:
    """``load_benchmark_rows``' rows as prompts (the style's template and the tokenizer's chat template)."""
    from rl_small.data import build_prompts

    rows, cfg = loaded
    return build_prompts(rows, tokenizer, cfg)


def run_benchmark(
    bench: Benchmark,
    backend: RolloutBackend,
    prompts: list[Any],
    protocol: EvalProtocol,
    grader: Any = None,
    done: list[dict[str, Any]] | None = None,
    chunk: int | None = None,
    on_chunk: Callable[[list[dict[str, Any]]], None] | None = None,
) -> BenchmarkReport:
    """Generate ``n`` samples per problem, grade them, and compute pass@k, maj@k, lengths, truncation.

    ``done``: samples of an interrupted run (whole problems); those of ``prompts`` are not generated again.
    ``chunk``: problems per generation call; ``on_chunk(samples)`` gets each graded chunk (to save it).
    """
    from rewards import build_reward

    grader = grader or build_reward(bench.grader)
    max_tok = protocol.max_new_tokens or bench.max_new_tokens
    spec = SamplingSpec(protocol.n, max_tok, protocol.temperature, protocol.top_p)
    order = {p.id: k for k, p in enumerate(prompts)}
    samples = [s for s in done or [] if s["id"] in order]
    finished = {s["id"] for s in samples}
    todo = [p for p in prompts if p.id not in finished]
    t0 = time.perf_counter()
    gen_s = 0.0
    step = chunk if chunk and chunk > 0 else max(len(todo), 1)
    progress = EvalProgress(bench.name, len(prompts), samples)
    for i in range(0, len(todo), step):
        t1 = time.perf_counter()
        rollouts = backend.generate(todo[i : i + step], spec)
        took = time.perf_counter() - t1
        gen_s += took
        new = grade_rollouts(bench, rollouts, protocol.n, grader)
        for sample in new:  # its share of the generation call: totals survive a resumed run
            sample["gen_seconds"] = took / max(len(new), 1)
        samples += new
        if on_chunk is not None:
            on_chunk(new)
        progress.update(len(todo[i : i + step]), new)
    samples.sort(key=lambda x: (order[x["id"]], x["sample"]))
    summary = summarize(samples, protocol.n, bench.grader == "math_accuracy")
    summary |= {"benchmark": bench.name, "mode": protocol.mode, "n": protocol.n, "temperature": protocol.temperature,
                "top_p": protocol.top_p, "max_new_tokens": max_tok, "style": protocol.style or bench.style,
                "problems": len(prompts), "resumed_problems": len(finished), "generate_seconds": gen_s,
                "seconds": time.perf_counter() - t0,
                "generate_seconds_all_runs": None if any("gen_seconds" not in x for x in samples)
                else sum(x["gen_seconds"] for x in samples)}
    return BenchmarkReport(bench.name, summary, samples)


def grade_rollouts(bench: Benchmark, rollouts: list[Any], n: int, grader: Any) -> list[dict[str, Any]]:
    """One record per rollout (prompt-major, ``n`` per problem): prompt, completion, extracted answer (math),
    gold, correct, tokens, truncated."""
    from rewards.math import extract_answer

    scores = grader([r.text for r in rollouts], **batch_columns(rollouts))
    is_math = bench.grader == "math_accuracy"
    return [
        {"id": r.prompt.id, "sample": i % n, "prompt": r.prompt.text, "completion": r.text,
         "extracted": extract_answer(r.text) if is_math else None, "gold": r.prompt.answer,
         "correct": bool(s), "tokens": len(r.completion_ids), "truncated": r.truncated}
        for i, (r, s) in enumerate(zip(rollouts, scores))
    ]


def summarize(samples: list[dict[str, Any]], n: int, majority: bool = True) -> dict[str, float]:
    """pass@1 (mean accuracy over all samples = avg@n), unbiased pass@k for k = 2, 4, ... <= n, maj@n (math),
    mean tokens and the share truncated at max_new_tokens."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_id.setdefault(s["id"], []).append(s)
    out: dict[str, float] = {}
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(len(g), sum(x["correct"] for x in g), k) for g in by_id.values()) / len(by_id)
    if majority and n > 1:
        hits = 0
        for g in by_id.values():
            vote = majority_vote([x["extracted"] for x in g])
            hits += any(x["correct"] for x in g if vote is not None and x["extracted"] == vote)
        out[f"maj@{n}"] = hits / len(by_id)
    out["len_mean"] = sum(s["tokens"] for s in samples) / len(samples)
    out["truncated"] = sum(s["truncated"] for s in samples) / len(samples)
    return out


HELDOUT = "heldout"  # in train.eval_benchmarks: the run's own held-out problems (those of the before/after evaluation)


class PeriodicEval:
    """In-training evaluation: greedy pass@1 on a fixed subset of each benchmark every ``every`` steps,
    returned as ``eval/<benchmark>/pass@1`` (and mean length) metrics. Prompts are loaded once. ``heldout``
    evaluates the run's held-out problems (all ``train.eval_samples`` of them, the before/after evaluation's, so
    the curve and the before/after numbers are comparable); the run hands them over with ``set_heldout``."""

    def __init__(self, names: list[str], tokenizer: Any, every: int, limit: int, max_new_tokens: int | None,
                 data_dir: str | None) -> None:
        unknown = [n for n in names if n not in BENCHMARKS and n != HELDOUT]
        if unknown:
            raise KeyError(f"train.eval_benchmarks: unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)} "
                           f"and {HELDOUT!r} (the run's held-out problems)")
        self.every = every
        self.protocol = EvalProtocol(max_new_tokens=max_new_tokens, limit=limit)
        self.prompts = {n: load_benchmark_prompts(BENCHMARKS[n], tokenizer, self.protocol, data_dir)
                        for n in names if n != HELDOUT}
        self.wants_heldout = HELDOUT in names
        self.heldout: tuple[list[Any], Any, int, int] | None = None

    def set_heldout(self, prompts: list[Any], grader: Any, max_new_tokens: int, chunk: int) -> None:
        """The held-out problems and grader of the before/after evaluation, for ``heldout`` (``rl_small.train``
        refuses a run that asks for it without any, before the model loads)."""
        self.heldout = (prompts, grader, max_new_tokens, chunk)

    @classmethod
    def from_config(cls, t: Any, tokenizer: Any) -> PeriodicEval | None:
        """The evaluation of ``train`` config ``t`` (eval_every, eval_benchmarks, ...), None when off; an unknown
        benchmark is a RecipeError."""
        from rl_small.config import RecipeError

        if not (t.eval_every and t.eval_benchmarks):
            return None
        try:
            return cls(t.eval_benchmarks, tokenizer, t.eval_every, t.eval_limit, t.eval_max_new_tokens, t.eval_data_dir)
        except KeyError as err:
            raise RecipeError(str(err.args[0])) from err

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def __call__(self, backend: RolloutBackend) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, prompts in self.prompts.items():
            s = run_benchmark(BENCHMARKS[name], backend, prompts, self.protocol).summary
            out[f"eval/{name}/pass@1"] = s["pass@1"]
            out[f"eval/{name}/len_mean"] = s["len_mean"]
        if self.heldout is not None:
            from rl_small.eval import evaluate

            prompts, grader, max_new_tokens, chunk = self.heldout
            r = evaluate(backend, prompts, grader, max_new_tokens, "held-out (periodic)", chunk)
            out[f"eval/{HELDOUT}/pass@1"], out[f"eval/{HELDOUT}/len_mean"] = r.accuracy, r.len_mean
        return out
