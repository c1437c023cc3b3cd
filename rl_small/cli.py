"""Command line: ``rl-small train [--recipe R] [key=value ...]``, ``rl-small serve --recipe R``,
``rl-small eval --model M --benchmarks ...``, ``rl-small report RUN_DIR ...``, ``rl-small bench [NAME ...]`` and
``rl-small plan RECIPE [--gpu NAME] [--gpus N]`` (memory per process before a launch) and
``rl-small data download --out DIR`` (the local data layout, from the hub).

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


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--gpu", default="h100-80gb", help="GPU model: h100-80gb, a100-40gb, a100-80gb, l4-24gb, "
                   "a10-24gb, h200-141gb, rtx4090-24gb, t4-16gb, v100-16gb/32gb, l40s-48gb, a6000-48gb")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (one process each; rank 0 hosts a spawned vLLM)")
    p.add_argument("--prompt-tokens", type=int, help="longest prompt in tokens (default: by task)")
    p.add_argument("--head", default="auto", choices=["auto", "naive", "chunked"],
                   help="log-prob head to assume (auto = chunked, the one the trainer uses; naive: full logits)")
    p.add_argument("--write-header", action="store_true",
                   help="write the smallest-GPU line ('# plan: fits ...') into the recipe's header comments")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan for rank 0 (and the other ranks when they differ) and the smallest GPU; 0 if it fits."""
    from rl_small.config import RecipeError, load_recipe
    from rl_small.plan import header_line, make_plan, render, smallest_gpu, write_header

    try:
        cfg = load_recipe(args.recipe, args.overrides)
        if args.gpus < 1:
            raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
        kw = {"gpu": args.gpu, "gpus": args.gpus, "prompt_tokens": args.prompt_tokens, "head": args.head}
        plans = [make_plan(cfg, rank=0, **kw)] + ([make_plan(cfg, rank=1, **kw)] if args.gpus > 1 else [])
        best, _ = smallest_gpu(cfg, gpus=args.gpus, prompt_tokens=args.prompt_tokens, head=args.head)
    except (RecipeError, FileNotFoundError, ValueError) as err:
        sys.stderr.write(f"rl-small plan: error: {err}\n")
        return 2
    out = [render(plans[0], f"{cfg.name}, rank 0 " if args.gpus > 1 else f"{cfg.name}, ")]
    if len(plans) > 1:
        out.append(render(plans[1], "ranks 1.. "))
    out.append(f"smallest listed GPU that fits ({args.gpus} GPU(s)): {best or 'none'}")
    if args.write_header:
        line = header_line(cfg, head=args.head, prompt_tokens=args.prompt_tokens)
        out.append(f"{args.recipe}: {'wrote' if write_header(args.recipe, line) else 'unchanged'} {line!r}")
    sys.stdout.write("\n".join(out) + "\n")
    return 0 if all(p.fits for p in plans) else 1


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
    tr = sub.add_parser("train", help="train with GRPO (default: the embedded SmolLM2-135M + LoRA run on CPU)",
                        epilog="every config key, its type, default and meaning: rl-small config [section]")
    add_train_args(tr)
    ev = sub.add_parser("eval", help="evaluate a model / trained adapter on GSM8K, MATH500, AIME, AMC, code")
    add_eval_args(ev)
    sv = sub.add_parser("serve", help="run a vLLM server (LoRA hot-swap) for a recipe's model; vllm_server connects")
    from rl_small.rollout.server import add_serve_args

    add_serve_args(sv)
    rp = sub.add_parser("report", help="HTML report (curves + tables) of one or several runs")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", help="output folder (default: <first run>/report)")
    bn = sub.add_parser("bench", help="run a benchmark of bench/ (tables + bench/results/*.json); no name: list them")
    bn.add_argument("name", nargs="?", help="benchmark (script name in bench/), e.g. trl_compare, scaling")
    bn.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    pl = sub.add_parser("plan", help="estimate memory per process for a recipe on a GPU, and whether it fits")
    add_plan_args(pl)
    from rl_small.config_help import add_config_args, run_config
    from rl_small.data.download import add_data_args, run_data

    add_data_args(sub.add_parser("data", help="data download --out DIR: the local layout --data-dir reads, from the hub"))
    add_config_args(sub.add_parser("config", help="every config key with its type, default and description"))
    args = parser.parse_args(argv)
    if args.command in ("config", "data"):
        sys.exit((run_config if args.command == "config" else run_data)(args))
    if args.command == "plan":
        sys.exit(run_plan(args))
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
        from rl_small.rollout.server import ServerStartError, serve

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
        except KeyboardInterrupt:  # run_eval said what is saved and how to resume
            sys.exit(130)
        return
    if args.command == "train":
        from rl_small.guards import exit_process
        from rl_small.train import run_cli

        exit_process(run_cli(args), command_line=argv is None)  # errors: one line naming the value; Ctrl-C: where to resume


if __name__ == "__main__":
    main()
