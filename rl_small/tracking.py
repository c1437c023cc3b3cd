"""Logging, metrics sinks and timers.

    tracker = Tracker(run_dir, ["tensorboard"])       # metrics.jsonl always; Accelerate trackers (train.trackers)
    with timer(metrics, M.TIME_ROLLOUT): ...          # adds metrics["timing/rollout"] = seconds (rl_small.metric_names)
    tracker.log(step, metrics)

Only the main process writes (``is_main``). No ``print`` in the package: one logger, ``rl_small``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from rl_small import metric_names as M

log = logging.getLogger("rl_small")
RUN_NAME = {"wandb": "name", "trackio": "name", "mlflow": "run_name", "swanlab": "experiment_name"}  # its keyword


def setup_logging(level: int = logging.INFO) -> None:
    """Rich console logging for the ``rl_small`` and ``rewards`` loggers (idempotent)."""
    from rich.logging import RichHandler

    for name in ("rl_small", "rewards"):
        lg = logging.getLogger(name)
        if not any(isinstance(h, RichHandler) for h in lg.handlers):
            lg.addHandler(RichHandler(show_path=False, rich_tracebacks=False, markup=False))
        lg.setLevel(level)
        lg.propagate = False


@contextlib.contextmanager
def timer(metrics: dict[str, float], key: str) -> Iterator[None]:
    """Time the block into ``metrics[key]`` (seconds; ``key``: a ``timing/`` name of rl_small.metric_names)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        metrics[key] = time.perf_counter() - t0


class Tracker:
    """Metrics sinks: ``metrics.jsonl`` (always) and Accelerate's trackers (``train.trackers``; None = tensorboard
    when installed): tensorboard in ``run_dir/tb``, the others in project ``rl-small`` as a run named after the
    run directory. At the first ``log`` (the trainer writes config.yaml after it builds this), the run
    directory's ``config.yaml`` is stored as the hyper-parameters."""

    def __init__(self, run_dir: Path, trackers: list[str] | None = None, is_main: bool = True) -> None:
        self.is_main = is_main
        self.path, self.resolved = run_dir / "metrics.jsonl", run_dir / "config.yaml"
        self.sinks: list[Any] = []
        self._config_stored = False
        if not is_main:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS
        from accelerate.utils import is_tensorboard_available

        default = ["tensorboard"] if is_tensorboard_available() else []
        for name in default if trackers is None else trackers:
            cls = LOGGER_TYPE_TO_CLASS[name]  # tensorboard and aim write into the run directory
            where = ("tb" if name == "tensorboard" else name, str(run_dir)) if cls.requires_logging_directory else ()
            sink = cls(*(where or ("rl-small",)), **({RUN_NAME[name]: run_dir.name} if name in RUN_NAME else {}))
            sink.start()
            self.sinks.append(sink)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self.sinks and not self._config_stored and self.resolved.exists():
            config = _flat(yaml.safe_load(self.resolved.read_text()))
            for sink in self.sinks:
                sink.store_init_configuration(config)
            self._config_stored = True
        for sink in self.sinks:
            sink.log(metrics, step=step)

    def close(self) -> None:
        while self.sinks:
            self.sinks.pop(0).finish()


def _flat(node: Any, key: str = "") -> dict[str, Any]:
    """A resolved config as ``{"algo.kl_coef": 0.0, ...}``: trackers take flat scalars (others as JSON text)."""
    if isinstance(node, dict):
        return {k2: v2 for k, v in node.items() for k2, v2 in _flat(v, f"{key}.{k}" if key else str(k)).items()}
    return {key: node if isinstance(node, (bool, int, float, str)) else json.dumps(node)}


def dump_completions(tr: Any, batch: Any, groups: list[Any]) -> int:
    """Every ``train.log_completions_every`` steps of trainer ``tr`` (0 = never), on the main process, after the
    step's update (``tr.step_no`` is the step as metrics.jsonl numbers it): one line per completion of the step's
    ``groups`` to ``completions.jsonl`` (TRL's ``log_completions``, verl's generation dumps): step, prompt id and
    text, group (its place in the batch), gold answer, completion, token count, truncated, reward and each component
    (None: abstained), advantage (token mean). Filler groups of dynamic sampling are left out. Returns lines."""
    every, step = tr.cfg.train.log_completions_every, tr.step_no
    if not every or step % every or not tr.acc.is_main_process:
        return 0
    lines = []
    for k, g in enumerate(groups):  # pad_batch keeps the order: the rows of group k are batch.group_rows[k]
        if not g.weight:
            continue
        for j, (i, r) in enumerate(zip(batch.group_rows[k], g.rollouts)):
            n = float(batch.mask[i].sum())
            adv = float((batch.advantages[i] * batch.mask[i]).sum()) / max(n, 1.0)
            lines.append(json.dumps({
                "step": step, "prompt_id": r.prompt.id, "group": k, "prompt": r.prompt.text,
                "answer": r.prompt.answer, "completion": r.text, "tokens": len(r.completion_ids),
                "truncated": r.truncated, "reward": g.rewards[j], "components": g.scores(j), "advantage": adv,
            }) + "\n")
    with (tr.run_dir / "completions.jsonl").open("a") as f:
        f.writelines(lines)
    return len(lines)


def truncate_metrics(run_dir: Path, step: int, is_main: bool = True, name: str = "metrics.jsonl") -> int:
    """Keep the lines of ``name`` (metrics.jsonl, completions.jsonl) with ``step <= step`` (a resumed run
    redoes the later steps; a line cut short by a kill is dropped too); rewritten atomically by the main
    process. Returns the number of lines dropped."""
    path = run_dir / name
    if not is_main or not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            ok = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            kept.append(line + "\n")
        else:
            dropped += line.strip() != ""
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
        log.info("%s: dropped %d line(s) after the resumed step %d", name, dropped, step)
    return dropped


def eta_text(remaining: int, seconds_per_step: float | None) -> str:
    """``eta 1:02:03`` for ``remaining`` steps at ``seconds_per_step`` (``eta -:--:--`` before a step is done)."""
    if seconds_per_step is None or remaining < 0:
        return "eta -:--:--"
    total = round(remaining * seconds_per_step)
    return f"eta {total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


class Progress:
    """A rich progress bar showing the ETA, reward, accuracy, length and step time; a no-op when disabled.

    The ETA is the remaining steps times the mean wall time of the steps done by this process (evaluations and
    checkpoints included). rich's own TimeRemainingColumn averages over a 30 s window, so with steps longer
    than that it never had two samples and stayed empty."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, console: Any = None) -> None:
        self._bar: Any = None
        self.total, self.done, self._t0 = total, start, time.perf_counter()
        self._start = start
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[eta]}"),
                TextColumn("{task.fields[info]}"), console=console,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="", eta=eta_text(0, None))
            self._bar.start()

    def seconds_per_step(self) -> float | None:
        steps = self.done - self._start
        return (time.perf_counter() - self._t0) / steps if steps > 0 else None

    def update(self, metrics: dict[str, float]) -> None:
        self.done += 1
        if self._bar is None:
            return
        info = (
            f"reward {metrics.get(M.REWARD_TOTAL, float('nan')):.3f}  "
            f"acc {metrics.get(M.REWARD_ACCURACY, float('nan')):.3f}  "
            f"len {metrics.get(M.ROLLOUT_LEN_MEAN, float('nan')):.0f}  "
            f"{metrics.get(M.TIME_STEP, float('nan')):.1f}s/step"
        )
        eta = eta_text(self.total - self.done, self.seconds_per_step())
        self._bar.update(self._task, advance=1, info=info, eta=eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
