"""Deadlines that reward code cannot cancel: ``with deadline(seconds): ...`` raises RewardTimeout in the block.

A watchdog thread interrupts the guarded thread when its deadline passes: the main thread through a signal
of our own (which also interrupts a blocking sleep / read), other threads through an asynchronous exception
(``PyThreadState_SetAsyncExc``). Unlike SIGALRM, reward code cannot cancel it: math-verify's
``signal.alarm(0)`` and SIGALRM handlers do not touch it. It fires again every REFIRE_S until the block
exits, so a reward that swallows RewardTimeout is stopped anyway, and the yielded Deadline's ``fired`` tells
the caller it overran. ``with shield(): ...`` defers it: code that must not be cut in half (a pool's
bookkeeping: kill a worker and forget it, fork one and read its pid) runs whole, and the deadline fires
when the shield ends. Limit: one C call that never returns to the interpreter cannot be interrupted
in-process (run such work in a subprocess); the watchdog logs its stack STUCK_WARN_S past the deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class RewardTimeout(BaseException):
    """Raised inside a reward that overran its deadline.

    A BaseException so that a reward's own ``except Exception`` (math-verify has one) cannot swallow it.
    """



_SIGNAL = (signal.SIGRTMIN + 6) if hasattr(signal, "SIGRTMIN") else signal.SIGUSR2
REFIRE_S = 0.1
STUCK_WARN_S = 5.0  # log where a thread is stuck this long past its deadline


@dataclass(eq=False)
class Deadline:
    """One armed deadline (yielded by ``deadline()``): ``fired`` says whether it expired inside the block."""

    seconds: float
    thread_id: int
    due: float
    fired: bool = False
    armed: bool = True
    fired_at: float = 0.0


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


class _Watchdog:
    """One daemon thread that fires the deadlines of every thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._active: list[Deadline] = []
        self._thread: threading.Thread | None = None
        self._shielded: dict[int, int] = {}  # thread id -> depth of its open shield() blocks

    def arm(self, d: Deadline) -> None:
        with self._cond:
            self._active.append(d)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="reward-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()

    def disarm(self, d: Deadline) -> None:
        with self._cond:
            d.armed = False
            if d in self._active:
                self._active.remove(d)
            if d.fired and not self.fired_for(d.thread_id):
                _set_async_exc(d.thread_id, None)  # one not raised yet must not land after the block

    def fired_for(self, thread_id: int) -> bool:
        """Whether an armed deadline of ``thread_id`` has expired (read without the lock: signal handler)."""
        return any(d.armed and d.fired and d.thread_id == thread_id for d in list(self._active))

    def due_now(self, thread_id: int) -> bool:
        """Whether ``thread_id`` must raise RewardTimeout now: a deadline expired and no shield is open."""
        return not self._shielded.get(thread_id) and self.fired_for(thread_id)

    def shield(self, thread_id: int, enter: bool) -> None:
        """Open (``enter``) or close one shield of ``thread_id``; while one is open the thread is not
        interrupted, and an interruption already sent but not yet raised is withdrawn."""
        with self._cond:  # the watchdog interrupts only while holding it
            if enter:  # withdraw first: nothing can raise between the count going up and the block
                _set_async_exc(thread_id, None)
            depth = self._shielded.get(thread_id, 0) + (1 if enter else -1)
            if depth > 0:
                self._shielded[thread_id] = depth
            else:
                self._shielded.pop(thread_id, None)

    def _interrupt(self, d: Deadline) -> None:
        main = threading.main_thread().ident
        if d.thread_id == main and signal.getsignal(_SIGNAL) is _on_signal:
            signal.pthread_kill(main, _SIGNAL)
        else:
            _set_async_exc(d.thread_id, RewardTimeout)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for d in [d for d in self._active if d.due <= now]:
                    if not d.fired:
                        d.fired, d.fired_at = True, now
                    elif d.fired_at and now - d.fired_at > STUCK_WARN_S:
                        self._warn_stuck(d)
                    d.due = now + REFIRE_S
                    if not self._shielded.get(d.thread_id):  # shielded: fired, raised when the shield ends
                        self._interrupt(d)
                wait = min((d.due for d in self._active), default=now + 60.0) - now
                self._cond.wait(max(wait, 0.001))

    @staticmethod
    def _warn_stuck(d: Deadline) -> None:
        d.fired_at = 0.0  # once
        frame = sys._current_frames().get(d.thread_id)
        where = "".join(traceback.format_stack(frame)[-4:]) if frame is not None else "?"
        log.warning("a reward is still running %gs past its %gs deadline (stuck in C code?):\n%s",
                    STUCK_WARN_S, d.seconds, where)


_WATCHDOG = _Watchdog()


def _after_fork_in_child() -> None:
    """A forked child (a grading process pool) gets a fresh watchdog: the parent's thread does not exist there
    and its lock may have been held at the fork."""
    global _WATCHDOG
    _WATCHDOG = _Watchdog()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _on_signal(signum: int, frame: Any) -> None:
    if _WATCHDOG.due_now(threading.get_ident()):
        raise RewardTimeout("deadline exceeded")


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[Deadline | None]:
    """Raise RewardTimeout in the block after ``seconds``, in any thread; nests (the shortest wins).

    Yields the Deadline, whose ``fired`` tells the caller afterwards whether the block overran even when the
    code inside caught the RewardTimeout. A block entered after an enclosing deadline expired raises at once.
    """
    if seconds is None:
        yield None
        return
    tid = threading.get_ident()
    if tid == threading.main_thread().ident and signal.getsignal(_SIGNAL) is not _on_signal:
        signal.signal(_SIGNAL, _on_signal)
    d = Deadline(seconds, tid, time.monotonic() + seconds)
    try:
        if _WATCHDOG.fired_for(tid):
            raise RewardTimeout("an enclosing deadline was exceeded")
        _WATCHDOG.arm(d)
        yield d
    finally:
        for _ in range(100):  # a RewardTimeout landing here must not leave the deadline armed
            try:
                _WATCHDOG.disarm(d)
                break
            except RewardTimeout:
                continue


@contextlib.contextmanager
def shield() -> Iterator[None]:
    """Defer this thread's deadlines during the block: it runs whole, and RewardTimeout is raised when it
    ends (when an armed deadline expired meanwhile and no exception is already leaving the block).

    For short bookkeeping that an interruption would leave half done; the deadline is late by the block's
    length, so keep it short (no waiting on an item's work inside).
    """
    tid = threading.get_ident()
    _WATCHDOG.shield(tid, True)
    try:
        yield
    finally:
        _WATCHDOG.shield(tid, False)
    if _WATCHDOG.due_now(tid):
        raise RewardTimeout("deadline exceeded (deferred by a shield)")
