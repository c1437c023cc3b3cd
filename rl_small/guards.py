"""Guards of a training run: nothing non-finite reaches the weights; Ctrl-C stops between steps.

    guarded_step(trainer, stats, add)     # the end of Trainer._minibatch_step: clip, check, step or skip
    stop = StopRequest(world)             # in fit(): stop.agreed() after each step; stop.close() at the end

A minibatch whose loss or gradient norm (policy or PPO critic) is NaN/inf is *skipped*: its gradients are
zeroed, no optimizer moves, and ``optim/skipped_steps`` counts it (per training step: the number of skipped
optimizer steps among its ``epochs x minibatches``; the sum over metrics.jsonl is the run's total). After
``train.max_nonfinite_steps`` skipped optimizer steps in a row the run stops with :class:`NonFiniteError`,
naming the step and the metrics that went bad. Under DDP every process takes the same decision (the flag is
summed over the processes), so no rank steps while another skips.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
LOSS_KEYS = ("loss/total", "loss/policy", "loss/kl", "loss/value")


class NonFiniteError(RuntimeError):
    """Too many non-finite optimizer steps in a row; the message names the step and the bad metrics."""


class NonFiniteGuard:
    """Counts consecutive non-finite optimizer steps and decides, identically on every process, to skip."""

    def __init__(self, max_in_row: int, world: Any) -> None:
        self.max_in_row = max_in_row
        self.world = world
        self.in_row = 0
        self._step: int | None = None
        self._bad_before: set[str] = set()

    def bad_values(self, stats: dict[str, float], norms: dict[str, float], step: int) -> dict[str, float]:
        """Non-finite grad norms, and loss metrics of ``stats`` that turned non-finite since the previous
        minibatch of the same training ``step`` (``stats`` accumulates over a step's minibatches)."""
        if step != self._step:  # a new training step (not id(stats): a new dict can reuse a freed one's id)
            self._step, self._bad_before = step, set()
        bad = {k: v for k, v in norms.items() if not math.isfinite(v)}
        new_losses = {k: stats[k] for k in LOSS_KEYS if k in stats and not math.isfinite(stats[k])}
        bad |= {k: v for k, v in new_losses.items() if k not in self._bad_before}
        self._bad_before |= set(new_losses)
        return bad

    def skip(self, step: int, stats: dict[str, float], norms: dict[str, float]) -> bool:
        """True when this optimizer step must be skipped (on any process); raises after too many in a row."""
        bad = self.bad_values(stats, norms, step)
        flag = self.world.sum(torch.tensor([1.0 if bad else 0.0], dtype=torch.float64))
        stats.setdefault("optim/skipped_steps", 0.0)
        if float(flag[0]) == 0:
            self.in_row = 0
            return False
        self.in_row += 1
        stats["optim/skipped_steps"] += 1.0
        where = ", ".join(f"{k}={v}" for k, v in bad.items()) or "on another process"
        log.warning("step %d: non-finite %s; optimizer step skipped (%d in a row)", step + 1, where, self.in_row)
        if self.in_row >= self.max_in_row:
            raise NonFiniteError(
                f"step {step + 1}: {self.in_row} optimizer steps in a row had a non-finite loss or gradient norm "
                f"({where}); stopped (train.max_nonfinite_steps={self.max_in_row}). Check the rewards and the "
                "learning rate; resume from the last checkpoint with rl-small train --resume <run_dir>"
            )
        return True


def _grad_norm(params: list[torch.nn.Parameter]) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def guarded_step(tr: Any, stats: dict[str, float], add: Callable[[str, float], None]) -> None:
    """Clip the policy gradients, reduce the critic's, then step both optimizers, or skip both (gradients
    zeroed) when the minibatch went non-finite on any process. The guard lives on the trainer."""
    guard = tr.__dict__.get("nonfinite_guard")
    if guard is None:
        guard = tr.__dict__["nonfinite_guard"] = NonFiniteGuard(tr.cfg.train.max_nonfinite_steps, tr.world)
    mgn = tr.cfg.optim.max_grad_norm
    norms = {"optim/grad_norm": float(tr.acc.clip_grad_norm_(tr.policy_params, mgn))}
    if tr.critic is not None:
        tr.world.mean_grads(tr.critic.parameters())  # not a DDP module: reduced here
        norms["critic/grad_norm"] = _grad_norm(list(tr.critic.parameters()))
    for k, v in norms.items():  # a skipped step logs its non-finite norm: the metrics show what happened
        add(k, v)
    if guard.skip(tr.step_no, stats, norms):
        tr.optimizer.zero_grad(set_to_none=True)
        if tr.critic is not None:
            tr.critic.optimizer.zero_grad(set_to_none=True)
        return
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    if tr.critic is not None:
        tr.critic.step(mgn)  # clips again (a no-op after the check) and steps


def step_schedulers(tr: Any, stats: dict[str, float], n_opt: int) -> None:
    """Advance the LR schedules (policy, critic) after a training step, unless every one of its ``n_opt``
    optimizer steps was skipped: the schedule follows the updates actually made (and torch warns about a
    scheduler step with no optimizer step before it)."""
    if stats.get("optim/skipped_steps", 0.0) >= n_opt:
        return
    tr.scheduler.step()
    if tr.critic is not None and tr.critic.scheduler is not None:
        tr.critic.scheduler.step()


class TrainingInterrupted(Exception):
    """The run stopped at a user's request (Ctrl-C) after a finished step, with a checkpoint of that step."""

    def __init__(self, step: int, run_dir: Path) -> None:
        super().__init__(f"stopped at step {step}; resume with: rl-small train --resume {run_dir}")
        self.step, self.run_dir = step, run_dir


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM (slurm ``scancel``, preemption) between or during steps: the first one asks the
    loop to stop once the current step is finished (fit() then saves a checkpoint and raises
    TrainingInterrupted); a second one aborts at once (KeyboardInterrupt: the step in progress is lost, the last
    checkpoint stays intact). Under torchrun (``accelerate launch`` with several processes) the terminal's
    Ctrl-C reaches each worker and torchrun forwards its own copy a moment later, so a repeat within
    ``TORCHRUN_REPEAT_S`` counts as the same request there (torchrun still SIGKILLs its workers 30 s after a
    Ctrl-C: a longer step is cut and the run resumes from the last checkpoint). Under DDP the request is summed
    over the processes, so every rank stops after the same step even if only one got the signal.
    Installed only from the main thread (signal handlers cannot be set elsewhere)."""

    TORCHRUN_REPEAT_S = 2.0
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, world: Any) -> None:
        self.world = world
        self.requested = False
        self._first_at = 0.0
        self._repeat_s = self.TORCHRUN_REPEAT_S if "TORCHELASTIC_RUN_ID" in os.environ else 0.0
        self._installed = threading.current_thread() is threading.main_thread()
        self._previous: dict[int, Any] = {}
        if self._installed:
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}

    def _on_signal(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.requested:
            if now - self._first_at < self._repeat_s:  # torchrun's forwarded copy of the same Ctrl-C
                return
            raise KeyboardInterrupt
        self.requested, self._first_at = True, now
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("%s: stopping after the current step (a checkpoint will be saved); Ctrl-C again aborts now",
                    name)

    def agreed(self) -> bool:
        """True on every process when any process was asked to stop."""
        flag = torch.tensor([1.0 if self.requested else 0.0], dtype=torch.float64)
        return float(self.world.sum(flag)[0]) > 0

    def close(self) -> None:
        if self._installed:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            self._installed = False


def exit_process(code: int, *, command_line: bool = True) -> None:
    """End a command-line run with ``code``; its outcome is decided and reported, so from here on a Ctrl-C or
    SIGTERM ends the process at once and quietly (a second Ctrl-C that arrived after a fast graceful stop
    used to raise KeyboardInterrupt inside an atexit finalizer and print its traceback). Under
    torch.distributed with several processes, the atexit handlers run (vLLM servers stopped, logs flushed)
    and the interpreter's teardown is skipped: tearing down gloo aborted a rank now and then after a finished
    run ("terminate called without an active exception", SIGABRT), which torchrun reported as a failed
    launch. ``command_line=False`` (main() called with an argv, as tests do in-process) only raises
    SystemExit."""
    import atexit
    import sys

    if not command_line:
        sys.exit(code)
    if threading.current_thread() is threading.main_thread():
        for sig in StopRequest.SIGNALS:
            signal.signal(sig, lambda signum, frame: os._exit(128 + signum))
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    sys.exit(code)
