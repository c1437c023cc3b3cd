"""Training entry point: ``python -m rl_small.train --recipe R [key=value ...]`` (also under
``accelerate launch``), and ``rl-small train`` from the CLI.

With no recipe it runs the embedded default: SmolLM2-135M-Instruct + LoRA + GRPO on the built-in ``arith``
task, CPU. It evaluates the base model on the held-out split, trains, evaluates the trained adapter and
reports before/after accuracy (also written to ``<run_dir>/summary.json``).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("rl_small.train")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="YAML recipe (default: the embedded default run)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=10 rollout.group_size=4")


def run_dir_for(cfg: Any) -> Path:
    name = cfg.train.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.train.output_dir) / name


def _held_out(trainer: Any) -> tuple[list[Any], Any]:
    from rewards import build_reward
    from rl_small.data import build_prompts, load_task_rows
    from rl_small.data.registry import TASKS

    cfg = trainer.cfg
    rows, _ = load_task_rows(cfg.data, cfg.data.eval_split, limit=cfg.train.eval_samples)
    name = TASKS[cfg.data.task].grader if cfg.data.task in TASKS else "math_accuracy"
    grader_spec = next((r for r in cfg.rewards if r.name == name), None)  # same parameters as in training
    grader = build_reward(name, grader_spec.params if grader_spec else {})
    return build_prompts(rows, trainer.tok, cfg.data), grader


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the trainer from args, evaluate before, fit, evaluate after; returns the summary."""
    from rl_small.config import dump_config, load_recipe
    from rl_small.eval import evaluate
    from rl_small.tracking import setup_logging
    from rl_small.trainer import Trainer

    setup_logging()
    if args.resume:
        run_dir = Path(args.resume)
        recipe = args.recipe or run_dir / "config.yaml"
        cfg = load_recipe(recipe, args.overrides)
    else:
        cfg = load_recipe(args.recipe, args.overrides)
        run_dir = run_dir_for(cfg)
    trainer = Trainer(cfg, run_dir, resume=bool(args.resume))  # validates rewards and data first
    dump_config(cfg, run_dir / "config.yaml")
    log.info("run dir %s", run_dir)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "seed": cfg.train.seed, "steps": cfg.train.steps}
    summary["train_rows"] = {"kept": trainer.data_stats.kept, "skipped_malformed": trainer.data_stats.skipped}
    prompts, grader = _held_out(trainer) if (cfg.train.eval_before or cfg.train.eval_after) else ([], None)
    max_tok = cfg.train.eval_max_new_tokens or cfg.rollout.max_new_tokens
    main = trainer.acc.is_main_process
    previous = run_dir / "summary.json"
    if args.resume and previous.exists():  # a resumed run keeps the base-model evaluation it already did
        summary.update({k: v for k, v in json.loads(previous.read_text()).items() if k == "before"})
    if cfg.train.eval_before and trainer.step_no == 0 and prompts:
        with trainer.acc.unwrap_model(trainer.model).disable_adapter() if cfg.model.lora else nullcontext():
            before = evaluate(trainer.backend, prompts, grader, max_tok)
        summary["before"] = {"accuracy": before.accuracy, "len_mean": before.len_mean, "n": before.n}
        if main:
            log.info("held-out accuracy before training: %.3f (n=%d)", before.accuracy, before.n)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))  # survives a killed run
    t0 = time.time()
    try:
        trainer.fit()
        summary["train_seconds"] = time.time() - t0
        if cfg.train.eval_after and prompts:
            after = evaluate(trainer.backend, prompts, grader, max_tok)
            summary["after"] = {"accuracy": after.accuracy, "len_mean": after.len_mean, "n": after.n}
            if main:
                (run_dir / "eval_after.jsonl").write_text("\n".join(json.dumps(s) for s in after.samples) + "\n")
    finally:
        trainer.backend.close()  # stops servers the run spawned
    if main:
        adapter_dir = run_dir / "adapter"
        model = trainer.acc.unwrap_model(trainer.model)
        if hasattr(model, "peft_config"):
            model.save_pretrained(adapter_dir)
            summary["adapter"] = str(adapter_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        _report(summary)
    return summary


def _report(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out accuracy ({summary['run_dir']})")
    for col in ("", "accuracy", "mean length", "n"):
        table.add_column(col)
    for key in ("before", "after"):
        if key in summary:
            s = summary[key]
            table.add_row(key, f"{100 * s['accuracy']:.1f}%", f"{s['len_mean']:.0f}", str(s["n"]))
    if "before" in summary and "after" in summary:
        delta = 100 * (summary["after"]["accuracy"] - summary["before"]["accuracy"])
        table.add_row("change", f"{delta:+.1f} points", "", "")
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rl_small.train", description=__doc__.split("\n\n")[0])
    add_train_args(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
