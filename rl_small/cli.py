"""Command line: ``rl-small train [--recipe R] [key=value ...]``, ``rl-small serve --recipe R``,
``rl-small eval --model M --benchmarks ...`` and ``rl-small report RUN_DIR ...``.

Heavy imports (torch, transformers) happen inside the subcommands, so ``rl-small --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys


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
    args = parser.parse_args(argv)
    if args.command == "report":
        import logging
        from pathlib import Path

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
            run_eval(args)
        except (RecipeError, FileNotFoundError, KeyError, ValueError) as err:
            sys.exit(f"rl-small eval: error: {err}")
        return
    if args.command == "train":
        from rl_small.config import RecipeError
        from rl_small.rollout.client import RolloutError
        from rl_small.rollout.vllm_server import ServerStartError
        from rl_small.train import run

        try:
            run(args)
        except (RecipeError, FileNotFoundError, RolloutError, ServerStartError) as err:
            sys.exit(f"rl-small: error: {err}")


if __name__ == "__main__":
    main()
