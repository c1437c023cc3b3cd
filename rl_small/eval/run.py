"""``rl-small eval``: evaluate a model (optionally with a trained adapter) on named benchmarks.

    rl-small eval --model smollm2-135m-instruct --benchmarks gsm8k,math500 --data-dir data
    rl-small eval --model M --benchmark minerva=minerva_math/test.jsonl,question=problem,answer=solution
    rl-small eval --run runs/my-run --benchmarks math500 --n 4 --temperature 0.6 --top-p 0.95

Writes ``<out>/eval/<benchmark>.jsonl`` (every sample) and ``<out>/eval/summary.json``, and prints a table.
Samples are appended chunk by chunk (``--chunk``); rerunning an interrupted evaluation into the same folder with
the same model, adapter and protocol generates only the problems not yet saved.
``--run RUN_DIR`` takes the model name from the run's config.yaml and its ``adapter/``, and writes into it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("rl_small.eval")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF hub id, local folder or built-in alias (default with --run: the run's)")
    p.add_argument("--adapter", help="LoRA adapter folder to evaluate on top of --model")
    p.add_argument("--run", metavar="RUN_DIR", help="a training run: its model, its adapter/, output into it")
    p.add_argument("--benchmarks", help="comma list of built-ins: gsm8k,math500,aime24,aime25,amc23,humaneval,mbpp "
                   "(default: gsm8k,math500 when no --benchmark is given)")
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME=PATH,question=F,answer=F[,...]",
                   help="any jsonl/json/parquet file, folder or hub dataset: question and gold-answer columns (a list: "
                   "its first element; a solution: its last \\boxed{}), optional grader=math|gsm8k|code|<reward>, "
                   "style=, split= (default test), max_new_tokens=, config= (hub subset); repeatable")
    p.add_argument("--data-dir", help="local data root: DIR/<benchmark>/test.jsonl (or .json, .parquet), the layout of "
                   "rl-small data download (default: the HF hub)")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH", help="local file for one benchmark")
    p.add_argument("--n", type=int, default=1, help="samples per problem (pass@1 is their mean accuracy)")
    p.add_argument("--temperature", type=float, default=None, help="default 0 (greedy) when n=1, else 0.6")
    p.add_argument("--top-p", type=float, default=None, help="default 1.0 when greedy, else 0.95")
    p.add_argument("--max-new-tokens", type=int, help="default: each benchmark's")
    p.add_argument("--style", help="prompt style: r1, qwen_math, deepscaler, plain, code (default: per benchmark)")
    p.add_argument("--limit", type=int, help="first K problems of each benchmark")
    p.add_argument("--batch-size", type=int, default=64, help="generation batch (hf backend)")
    p.add_argument("--chunk", type=int, help="problems per generation call (default: the requests in flight, "
                   "--batch-size / n for hf, 256 / n for vLLM); each finished chunk is saved and logged, and a rerun "
                   "with the same --out, model and protocol resumes after it (0: all at once)")
    p.add_argument("--backend", choices=["auto", "hf", "vllm_engine", "vllm_server"], default="auto",
                   help="auto: vllm_engine when vllm is installed, else hf")
    p.add_argument("--server-url", action="append", default=[], help="vllm_server: a running server (repeatable)")
    p.add_argument("--max-model-len", type=int, default=4096, help="vLLM context length (prompt + completion)")
    p.add_argument("--kv-cache-gib", type=int, default=4, help="vLLM on CPU: KV cache GiB (sequences in flight)")
    p.add_argument("--out", help="output folder (default: the run dir, else runs/eval-<time>)")


def protocol_from_args(args: argparse.Namespace) -> Any:
    from rl_small.eval.benchmarks import EvalProtocol

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    sampled = args.n > 1
    temp = args.temperature if args.temperature is not None else (0.6 if sampled else 0.0)
    if temp == 0 and sampled:
        raise ValueError(f"--n {args.n} with temperature 0 gives {args.n} identical samples; set --temperature")
    top_p = args.top_p if args.top_p is not None else (0.95 if temp > 0 else 1.0)
    return EvalProtocol(args.n, temp, top_p, args.max_new_tokens, args.style, args.limit)


def select_benchmarks(args: argparse.Namespace) -> list[Any]:
    """The built-ins of ``--benchmarks`` (``--data NAME=PATH`` reading one from a file) and the generic
    ``--benchmark`` specs, in that order; names must be unique."""
    import dataclasses

    from rl_small.config import RecipeError
    from rl_small.eval.benchmarks import BENCHMARKS, parse_benchmark_spec

    spec = args.benchmarks if args.benchmarks is not None else ("" if args.benchmark else "gsm8k,math500")
    names = [b.strip() for b in spec.split(",") if b.strip()]
    unknown = [b for b in names if b not in BENCHMARKS]
    if unknown:
        raise RecipeError(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)} (any other file: "
                          "--benchmark NAME=PATH,question=FIELD,answer=FIELD)")
    paths = dict(_split_pair(x) for x in args.data)
    benches = [dataclasses.replace(BENCHMARKS[n], path=paths.get(n)) for n in names]
    benches += [parse_benchmark_spec(x) for x in args.benchmark]
    seen = [b.name for b in benches]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise RecipeError(f"benchmark(s) {dupes} given twice (--benchmarks and --benchmark)")
    if not benches:
        raise RecipeError("no benchmark: give --benchmarks NAMES or --benchmark NAME=PATH,question=..,answer=..")
    return benches


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from rl_small.config import RecipeError, load_recipe
    from rl_small.eval.benchmarks import load_benchmark_rows
    from rl_small.tracking import setup_logging

    setup_logging()
    benches = select_benchmarks(args)
    protocol = protocol_from_args(args)
    model_name, adapter = args.model, args.adapter
    if args.run:
        run_dir = Path(args.run)
        if not (run_dir / "config.yaml").exists():
            raise FileNotFoundError(f"--run {str(run_dir)!r}: no config.yaml (not a run directory)")
        model_name = model_name or load_recipe(run_dir / "config.yaml").model.name
        adapter = adapter or (str(run_dir / "adapter") if (run_dir / "adapter").exists() else None)
    if not model_name:
        raise RecipeError("give --model (or --run RUN_DIR)")
    out = Path(args.out or args.run or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}") / "eval"
    _check_out(out)
    # every benchmark's data first: data that cannot be found stops here, before a model loads or a folder is made
    loaded = {b.name: load_benchmark_rows(b, protocol, args.data_dir) for b in benches}
    kind = args.backend
    if kind == "auto":
        import importlib.util

        kind = "vllm_engine" if importlib.util.find_spec("vllm") is not None else "hf"
    chunk = args.chunk if args.chunk is not None else max(1, (args.batch_size if kind == "hf" else 256) // protocol.n)
    made = _make_dirs(out)
    try:
        backend, tok = _backend(kind, model_name, adapter, args, out)
    except BaseException:
        _remove_empty(made)  # a model that fails to load leaves no empty output folder
        raise
    summary: dict[str, Any] = {"model": model_name, "adapter": adapter, "backend": kind, "benchmarks": {}}
    try:
        _run_all(benches, loaded, backend, tok, protocol, chunk, out, summary)
    except KeyboardInterrupt:
        saved = sum(1 for b in benches if (out / f"{b.name}.jsonl").exists())
        log.warning("stopped: the finished chunks are saved in %s (%d file(s)); rerun the same command to resume",
                    out, saved)
        raise
    finally:
        backend.close()
        shutil.rmtree(out / "merged-model", ignore_errors=True)  # a merged adapter: full weights, not kept
    print_table(summary)
    return summary


def _check_out(out: Path) -> None:
    """Refuse, before data or a model loads, an output folder that cannot be made (a file in the way, no
    permission to write); nothing is created here."""
    near = next(p for p in [out, *out.parents] if p.exists())
    if not near.is_dir():
        raise NotADirectoryError(f"output folder {str(out)!r}: {str(near)!r} is a file, not a folder")
    if not os.access(near, os.W_OK):
        raise PermissionError(f"output folder {str(out)!r}: {str(near)!r} is not writable")


def _make_dirs(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents; the ones created, deepest first."""
    made = [p for p in [out, *out.parents] if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    return made


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; one that holds anything stays
        try:
            folder.rmdir()
        except OSError:
            return


def _run_all(benches: list[Any], loaded: dict[str, Any], backend: Any, tok: Any, protocol: Any, chunk: int,
             out: Path, summary: dict[str, Any]) -> None:
    from rl_small.eval.benchmarks import render_benchmark

    meta = {"model": summary["model"], "adapter": summary["adapter"], "adapter_files": _stamp(summary["adapter"])}
    summary["benchmarks"].update(_earlier_results(out, meta, skip=[b.name for b in benches]))
    for bench in benches:
        prompts = render_benchmark(loaded[bench.name], tok)
        log.info("%s: %d problems, %s, n=%d", bench.name, len(prompts), protocol.mode, protocol.n)
        report = evaluate_into(out, bench, backend, prompts, protocol, meta, chunk)
        summary["benchmarks"][bench.name] = report.summary
        (out / "summary.json").write_text(json.dumps(summary, indent=2))


def evaluate_into(out: Path, bench: Any, backend: Any, prompts: list[Any], protocol: Any, meta: dict[str, Any],
                  chunk: int | None = None) -> Any:
    """``run_benchmark`` saving into ``out/<benchmark>.jsonl`` chunk by chunk, resuming what an interrupted run
    with the same ``meta`` (model, adapter) and protocol left there; the file ends in problem order."""
    from rl_small.eval.benchmarks import run_benchmark

    path = out / f"{bench.name}.jsonl"
    spec = {"protocol": dataclasses.asdict(protocol) | {"limit": None}, "benchmark": dataclasses.asdict(bench)}
    done = _resumable(path, meta | spec, protocol.n)
    if done:
        log.info("%s: resuming: %d problems already in %s", bench.name, len({s['id'] for s in done}), path)

    def save(samples: list[dict[str, Any]]) -> None:
        with path.open("a") as f:
            f.write("".join(json.dumps(s) + "\n" for s in samples))
            f.flush()
            os.fsync(f.fileno())

    report = run_benchmark(bench, backend, prompts, protocol, done=done, chunk=chunk, on_chunk=save)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(s) + "\n" for s in report.samples))
    os.replace(tmp, path)
    return report


def _earlier_results(out: Path, meta: dict[str, Any], skip: list[str]) -> dict[str, Any]:
    """Benchmarks that an earlier evaluation of the same model and adapter left in ``out`` (and that this one
    does not rerun): kept in summary.json so that evaluating one more benchmark into a folder adds a row."""
    try:
        earlier = json.loads((out / "summary.json").read_text())["benchmarks"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    kept = {}
    for name, result in earlier.items():
        meta_path = out / f"{name}.meta.json"
        try:
            same = {k: v for k, v in json.loads(meta_path.read_text()).items()
                    if k not in ("protocol", "benchmark")} == meta
        except (OSError, ValueError, AttributeError):
            same = False
        if name not in skip and same and (out / f"{name}.jsonl").exists():
            kept[name] = result
    if kept:
        log.info("keeping the earlier results of %s in %s", ", ".join(sorted(kept)), out / "summary.json")
    return kept


def _stamp(folder: str | None) -> list[list[Any]]:
    """(name, size, mtime) of the files of an adapter folder: a retrained adapter is not resumed from."""
    if not folder or not Path(folder).is_dir():
        return []
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(Path(folder).iterdir()) if f.is_file()]


def _resumable(path: Path, meta: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The whole problems (``n`` samples each) of an interrupted evaluation in ``path`` made with the same
    model, adapter and protocol (``<path>.meta.json``); otherwise start ``path`` afresh. The file is rewritten
    with just those samples, so a torn last write is dropped."""
    meta_path = path.with_suffix(".meta.json")
    done: list[dict[str, Any]] = []
    if path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == json.loads(json.dumps(meta)):
        by_id: dict[str, list[dict[str, Any]]] = {}
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                by_id.setdefault(row["id"], []).append(row)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by the interruption
        done = [r for rows in by_id.values() if len(rows) == n for r in rows]
    elif path.exists():
        log.info("%s: written with another model or protocol: starting again", path)
    path.write_text("".join(json.dumps(s) + "\n" for s in done))
    meta_path.write_text(json.dumps(meta, indent=2))
    return done


def _backend(kind: str, model_name: str, adapter: str | None, args: argparse.Namespace, out: Path) -> tuple[Any, Any]:
    """The generation backend for ``kind`` with ``adapter`` (if any) served as version 1."""
    if kind == "hf":
        from rl_small.rollout.hf import HFBackend

        import torch

        model, tok = _load(model_name, adapter)
        if torch.cuda.is_available():  # the trainer's Accelerator places its model; here nothing else would
            model = model.to("cuda")
        return HFBackend(model, tok, batch_size=args.batch_size), tok
    from rl_small.config import RolloutConfig
    from rl_small.models import load_tokenizer, resolve_model
    from rl_small.rollout.factory import make_backend

    path = resolve_model(model_name)
    tok = load_tokenizer(path)
    spawn = kind == "vllm_server" and not args.server_url
    if adapter and not args.server_url:
        # merged once into full weights: vLLM's LoRA path costs 2.3x per token here (SmolLM2-135M, 64 sequences,
        # 2 CPU cores: 98 tok/s without LoRA, 42 with an r=16 all-linear adapter)
        path = _merged(model_name, adapter, out / "merged-model")
    cfg = RolloutConfig(backend=kind, server_urls=args.server_url, spawn=spawn, max_model_len=args.max_model_len,
                        kv_cache_gib=args.kv_cache_gib)
    rank = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"] if args.server_url and adapter else None
    backend = make_backend(cfg, None, tok, model_name=path, lora_rank=rank, run_dir=out)
    if adapter and args.server_url:
        backend.sync(Path(adapter), version=1)  # a running server: hot-load the adapter
    return backend, tok


def _merged(model_name: str, adapter: str, folder: Path) -> str:
    """``model_name`` with ``adapter`` merged in, saved to ``folder`` (with the tokenizer) for vLLM."""
    model, tok = _load(model_name, adapter)
    model.merge_and_unload().save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _split_pair(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ValueError(f"--data expects NAME=PATH, got {text!r}")
    name, path = text.split("=", 1)
    return name.strip(), path.strip()


def _load(model_name: str, adapter: str | None) -> tuple[Any, Any]:
    from rl_small.config import ModelConfig
    from rl_small.models import load_adapter, load_policy

    model, tok = load_policy(ModelConfig(name=model_name, lora=None))
    if adapter:
        model = load_adapter(model, adapter)
    return model.eval(), tok


def print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"{summary['model']}" + (f" + {summary['adapter']}" if summary.get("adapter") else "")
    table = Table(title=title)
    for col in ("benchmark", "mode", "problems", "pass@1", "more", "mean tokens", "truncated", "seconds"):
        table.add_column(col)
    for name, s in summary["benchmarks"].items():
        more = ", ".join(f"{k} {100 * v:.1f}" for k, v in s.items() if k.startswith(("pass@", "maj@")) and k != "pass@1")
        table.add_row(name, f"{s['mode']} n={s['n']}", str(s["problems"]), f"{100 * s['pass@1']:.1f}%", more,
                      f"{s['len_mean']:.0f}", f"{100 * s['truncated']:.0f}%", f"{s['seconds']:.0f}")
    Console().print(table)
