"""Command line: ``rl-small train [--recipe R] [key=value ...]``, ``rl-small serve --recipe R``,
``rl-small eval --model M --benchmarks ...``, ``rl-small report RUN_DIR ...`` and ``rl-small bench [NAME ...]``.

Heavy imports (torch, transformers) happen inside the subcommands, so ``rl-small --help`` is instant.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def benchmarks(folder: Path = BENCH_DIR) -> dict[str, str]:
    """Benchmark name (script stem) -> the first paragraph of its docstring, for every script in ``bench/``."""
    import ast

    if not folder.is_dir():
        raise FileNotFoundError(f"no benchmark folder at {folder}: `rl-small bench` runs the scripts of a source "
                                "checkout (pip install -e .), which a wheel install does not have")
    out = {}
    for script in sorted(folder.glob("*.py")):
        doc = ast.get_docstring(ast.parse(script.read_text())) or ""
        if script.stem != "common":
            out[script.stem] = " ".join(doc.split("\n\n")[0].split())
    return out


def run_bench(name: str | None, args: list[str], folder: Path = BENCH_DIR) -> int:
    """List the benchmarks (no name), or run ``bench/<name>.py args`` with this interpreter; its exit code."""
    known = benchmarks(folder)
    if name is None:
        sys.stdout.write("".join(f"{stem:<16}{line}\n" for stem, line in known.items()))
        return 0
    if name not in known:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(known)}")
    return subprocess.call([sys.executable, str(folder / f"{name}.py"), *args])


def check_adapter_dir(folder: str | None) -> None:
    """Refuse, before a model loads, an adapter folder whose ``adapter_config.json`` is not a LoRA config
    (missing, not JSON, ``{}``); a folder that does not exist is left to the loader's own message."""
    import json

    if folder is None or not Path(folder).is_dir():
        return
    path = Path(folder) / "adapter_config.json"
    try:
        conf = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"adapter folder {folder!r} has no adapter_config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"adapter config {str(path)!r} is not valid JSON ({err})") from None
    missing = [k for k in ("peft_type", "r") if not isinstance(conf, dict) or k not in conf]
    if missing:
        raise ValueError(f"adapter config {str(path)!r} is not a LoRA adapter config: missing {missing} "
                         f"(got {json.dumps(conf)[:200]})")


def main(argv: list[str] | None = None) -> None:
    from rl_small.eval.run import add_eval_args
    from rl_small.train import add_train_args

    parser = argparse.ArgumentParser(prog="rl-small", description="RL post-training for small language models")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train with GRPO (default: the embedded SmolLM2-135M + LoRA run on CPU)")
    add_train_args(tr)
    ev = sub.add_parser("eval", help="evaluate a model / trained adapter on GSM8K, MATH500, AIME, AMC, code")
    add_eval_args(ev)
    sv = sub.add_parser("serve", help="run a vLLM server (LoRA hot-swap) for a recipe's model; vllm_server connects")
    from rl_small.rollout.vllm_server import add_serve_args

    add_serve_args(sv)
    rp = sub.add_parser("report", help="HTML report (curves + tables) of one or several runs")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", help="output folder (default: <first run>/report)")
    bn = sub.add_parser("bench", help="run a benchmark of bench/ (tables + bench/results/*.json); no name: list them")
    bn.add_argument("name", nargs="?", help="benchmark (script name in bench/), e.g. trl_compare, scaling")
    bn.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    args = parser.parse_args(argv)
    if args.command == "bench":
        try:
            code = run_bench(args.name, args.bench_args)
        except (FileNotFoundError, ValueError) as err:
            sys.exit(f"rl-small bench: error: {err}")
        sys.exit(code)
    if args.command == "report":
        import logging

        from rl_small.eval.report import make_report
        from rl_small.tracking import setup_logging

        setup_logging()
        try:
            page = make_report([Path(r) for r in args.runs], Path(args.out or Path(args.runs[0]) / "report"))
        except (FileNotFoundError, ModuleNotFoundError) as err:
            sys.exit(f"rl-small report: error: {err}")
        logging.getLogger("rl_small.report").info("report: %s", page)
        return
    if args.command == "serve":
        from rl_small.config import RecipeError
        from rl_small.rollout.vllm_server import ServerStartError, serve

        try:
            serve(args)
        except (RecipeError, ServerStartError) as err:
            sys.exit(f"rl-small serve: error: {err}")
        return
    if args.command == "eval":
        from rl_small.config import RecipeError
        from rl_small.eval.run import run_eval

        try:
            check_adapter_dir(args.adapter or (str(Path(args.run) / "adapter") if args.run else None))
            run_eval(args)
        except (RecipeError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError, ValueError) as err:
            sys.exit(f"rl-small eval: error: {err}")
        return
    if args.command == "train":
        from rl_small.train import run_cli

        sys.exit(run_cli(args))  # errors: one line naming the value; Ctrl-C: where to resume


if __name__ == "__main__":
    main()
