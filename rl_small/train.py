"""Training entry point: ``python -m rl_small.train --recipe R [key=value ...]`` (also under
``accelerate launch``), and ``rl-small train`` from the CLI.

With no recipe it runs the embedded default: SmolLM2-135M-Instruct + LoRA + GRPO on the built-in ``arith``
task, CPU. It evaluates the base model on the held-out split, trains, evaluates the trained adapter and
reports before/after accuracy (also written to ``<run_dir>/summary.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from rl_small.rundir import is_main_rank

log = logging.getLogger("rl_small.train")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="YAML recipe (default: the embedded default run)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=10 rollout.group_size=4")


def run_dir_for(cfg: Any) -> Path:
    """``output_dir/run_name``, or ``output_dir/<recipe name>-<start time>``. Under a launcher with several
    processes the time is the launcher's start (every rank's parent), so ranks started across a second boundary
    still agree on the folder."""
    started = time.time()
    if not cfg.train.run_name and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import psutil  # a dependency of accelerate

        started = psutil.Process(os.getppid()).create_time()
    name = cfg.train.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}"
    return Path(cfg.train.output_dir) / name


def eval_rows(cfg: Any) -> list[dict[str, Any]] | None:
    """The held-out rows of the before/after evaluations (None when both are off), and a check that the data of
    ``train.eval_benchmarks`` can be read: both before any model loads or run folder is made, so that data that
    cannot be found (offline, no local path) is one error line saying what to set."""
    from rl_small.config import RecipeError
    from rl_small.data.files import DataError

    try:
        return _eval_rows(cfg)
    except DataError:
        raise
    except (KeyError, ValueError) as err:  # an unknown task / style, a task without its fields: config errors
        raise RecipeError(str(err.args[0]) if err.args else repr(err)) from None


def _eval_rows(cfg: Any) -> list[dict[str, Any]] | None:
    from rl_small.config import RecipeError
    from rl_small.data import load_task_rows
    from rl_small.data.files import DataError
    from rl_small.eval.benchmarks import BENCHMARKS, HELDOUT, EvalProtocol, load_benchmark_rows

    t = cfg.train
    for name in t.eval_benchmarks if t.eval_every else []:
        if name in BENCHMARKS:  # an unknown name is the trainer's config error
            load_benchmark_rows(BENCHMARKS[name], EvalProtocol(limit=t.eval_limit), t.eval_data_dir,
                                data_flag="train.eval_data_dir=DIR")
    curve = bool(t.eval_every) and HELDOUT in t.eval_benchmarks
    if not (t.eval_before or t.eval_after or curve):
        return None
    try:
        rows = load_task_rows(cfg.data, cfg.data.eval_split, limit=t.eval_samples)[0]
        if curve and not rows:
            raise RecipeError(f"train.eval_benchmarks: {HELDOUT!r} needs held-out problems and there are none "
                              f"(train.eval_samples={t.eval_samples}, data.eval_split={cfg.data.eval_split!r})")
        return rows
    except DataError as err:
        raise DataError(f"held-out evaluation (data.eval_split={cfg.data.eval_split!r}): {err}; set data.path to "
                        f"a local file or a folder with {cfg.data.eval_split}.jsonl (or .json, .parquet), or "
                        "train.eval_before=false train.eval_after=false") from None


def _held_out(trainer: Any, rows: list[dict[str, Any]]) -> tuple[list[Any], Any]:
    from rewards import build_reward
    from rl_small.data import build_prompts
    from rl_small.data.registry import TASKS

    cfg = trainer.cfg
    name = TASKS[cfg.data.task].grader if cfg.data.task in TASKS else "math_accuracy"
    grader_spec = next((r for r in cfg.rewards if r.name == name), None)  # same parameters as in training
    grader = build_reward(name, grader_spec.params if grader_spec else {})
    return build_prompts(rows, trainer.tok, cfg.data), grader


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the trainer from args, evaluate before, fit, evaluate after; returns the summary."""
    from rl_small.checkpoint import clean_temporaries
    from rl_small.config import dump_config, load_recipe
    from rl_small.eval import evaluate, paired, read_samples
    from rl_small.rundir import lock_run_dir
    from rl_small.tracking import setup_logging
    from rl_small.trainer import Trainer

    setup_logging()
    if args.resume:
        run_dir = Path(args.resume)
        recipe = args.recipe or run_dir / "config.yaml"
        if not Path(recipe).is_file():
            raise FileNotFoundError(f"--resume {str(run_dir)!r}: no {str(recipe)!r} (is it a run directory?)")
        cfg = load_recipe(recipe, args.overrides)
    else:
        cfg = load_recipe(args.recipe, args.overrides)
        run_dir = run_dir_for(cfg)
    if args.resume and (done := finished_summary(run_dir, cfg.train.steps)) is not None:  # reads summary.json only
        log.info("run %s already finished (%d steps; see summary.json): nothing to do. To train further, "
                 "resume with a larger train.steps=N", run_dir, cfg.train.steps)
        return done
    held_rows = eval_rows(cfg)  # evaluation data before the run folder and the model
    lock = lock_run_dir(run_dir)  # one writer per run directory, for this process's lifetime
    if not args.resume:
        refuse_earlier_run(run_dir)
    if is_main_rank():
        clean_temporaries(run_dir)  # folders of saves a killed run left behind (the lock holder only)
    trainer = Trainer(cfg, run_dir, resume=bool(args.resume))  # validates rewards and data first
    dump_config(cfg, run_dir / "config.yaml")
    log.info("run dir %s", run_dir)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "seed": cfg.train.seed, "steps": cfg.train.steps}
    summary["train_rows"] = {"kept": trainer.data_stats.kept, "skipped_malformed": trainer.data_stats.skipped}
    prompts, grader = _held_out(trainer, held_rows) if held_rows is not None else ([], None)
    max_tok = cfg.train.eval_max_new_tokens or cfg.rollout.max_new_tokens
    chunk = cfg.rollout.generation_batch_size if cfg.rollout.backend == "hf" else 256  # requests in flight
    if trainer.periodic_eval is not None and trainer.periodic_eval.wants_heldout:
        trainer.periodic_eval.set_heldout(prompts, grader, max_tok, chunk)  # train.eval_benchmarks: heldout
    main = trainer.is_main
    previous = run_dir / "summary.json"
    if args.resume and previous.exists():  # a resumed run keeps the base-model evaluation it already did
        summary.update({k: v for k, v in json.loads(previous.read_text()).items() if k == "before"})
    if cfg.train.eval_before and trainer.step_no == 0 and prompts:
        with trainer.base_policy():
            before = evaluate(trainer.backend, prompts, grader, max_tok, "held-out before training", chunk)
        summary["before"] = {"accuracy": before.accuracy, "len_mean": before.len_mean, "n": before.n}
        if main:
            log.info("held-out accuracy before training: %.3f (n=%d)", before.accuracy, before.n)
            (run_dir / "eval_before.jsonl").write_text("".join(json.dumps(s) + "\n" for s in before.samples))
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))  # survives a killed run
    t0 = time.time()
    try:
        trainer.fit()
        summary["train_seconds"] = time.time() - t0
        if trainer.save_adapter(run_dir / "adapter"):  # before any evaluation: a failing one loses no training
            summary["adapter"] = str(run_dir / "adapter")
        if main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.train.eval_after and prompts:
            after = evaluate(trainer.backend, prompts, grader, max_tok, "held-out after training", chunk)
            summary["after"] = {"accuracy": after.accuracy, "len_mean": after.len_mean, "n": after.n}
            if main:
                (run_dir / "eval_after.jsonl").write_text("".join(json.dumps(s) + "\n" for s in after.samples))
                if before_rows := read_samples(run_dir / "eval_before.jsonl"):  # this run's, or a resumed one's
                    summary["paired"] = paired(before_rows, after.samples)
    finally:
        trainer.backend.close()  # stops servers the run spawned
    if main:
        summary["finished"] = True
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        _report(summary)
    lock.release()
    return summary


def refuse_earlier_run(run_dir: Path) -> None:
    """A new run must not write into the directory of an earlier one that can be resumed (its metrics would be
    appended to the earlier run's and its checkpoints mixed with them). An earlier run that left no checkpoint
    has nothing to resume: its metrics and summary are removed and the new run starts over."""
    from rl_small.checkpoint import list_checkpoints
    from rl_small.rundir import RunDirError

    found = [n for n in ("checkpoints", "adapter") if (run_dir / n).exists()]
    if list_checkpoints(run_dir) or (run_dir / "adapter").exists():
        raise RunDirError(f"run directory {str(run_dir)!r} already holds a run ({', '.join(found)}): continue it "
                          f"with rl-small train --resume {run_dir}, or choose another train.run_name")
    stale = [p for p in (run_dir / "metrics.jsonl", run_dir / "summary.json", run_dir / "eval_before.jsonl")
             if p.exists()]
    if stale and is_main_rank():
        log.warning("%s: an earlier run left no checkpoint; starting over (removed %s)", run_dir,
                    ", ".join(p.name for p in stale))
        for p in stale:
            p.unlink()


def finished_summary(run_dir: Path, steps: int) -> dict[str, Any] | None:
    """The summary of a run that completed ``steps`` steps and its final evaluation, else None."""
    from rl_small.checkpoint import list_checkpoints

    path, ckpts = run_dir / "summary.json", list_checkpoints(run_dir)
    if not path.exists() or not ckpts:
        return None
    summary = json.loads(path.read_text())
    last = json.loads((ckpts[-1] / "trainer_state.json").read_text())["step"]
    return summary if summary.get("finished") and last >= steps else None


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
    if "paired" in summary:  # problem by problem: eval_before.jsonl against eval_after.jsonl
        p = summary["paired"]
        table.add_row("solved by both", str(p["both"]), "", str(p["problems"]))
        table.add_row("before only / after only", f"{p['before_only']} / {p['after_only']}", "", "")
        log.info("held-out, problem by problem: %d solved before and after, %d before only, %d after only, "
                 "%d neither (of %d)", p["both"], p["before_only"], p["after_only"], p["neither"], p["problems"])
    Console().print(table)


def run_cli(args: argparse.Namespace) -> int:
    """``run`` for a command line: expected failures become one ``rl-small: error: ...`` line (exit 1), a
    Ctrl-C a ``stopped at step N; resume with ...`` line (exit 130); no traceback for either."""
    import sys

    from rewards.base import RewardError
    from rl_small.config import RecipeError
    from rl_small.data.files import DataError
    from rl_small.guards import NonFiniteError, TrainingInterrupted
    from rl_small.rollout.base import RolloutError
    from rl_small.rollout.server import ServerStartError
    from rl_small.rundir import RunDirError

    where = f"; resume with: rl-small train --resume {args.resume}" if args.resume else ""
    try:  # the outer handler: a second Ctrl-C that lands while the stop or error line is being written
        try:
            run(args)
        except TrainingInterrupted as stop:
            sys.stderr.write(f"rl-small: {stop}\n")
            return 130
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training steps
            sys.stderr.write(f"rl-small: interrupted (the last checkpoint is intact){where}\n")
            return 130
        except (RecipeError, FileNotFoundError, DataError, RunDirError, NonFiniteError, RolloutError,
                ServerStartError, RewardError) as err:
            sys.stderr.write(f"rl-small: error: {err}\n")
            return 1
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> None:
    from rl_small.guards import exit_process

    p = argparse.ArgumentParser(prog="python -m rl_small.train", description=__doc__.split("\n\n")[0])
    add_train_args(p)
    exit_process(run_cli(p.parse_args(argv)), command_line=argv is None)


if __name__ == "__main__":
    main()
