"""A small persistent pool of processes that run math-verify, each item under its own wall clock.

    pool = shared_pool(workers=2)
    pool.run([[("x^2+2x+1", "(x+1)^2")], [("9^{9^{9^{9}}}", "12")]], timeout_s=2.0)
    -> [[True], None]          # None: that item overran its deadline; its worker was killed and replaced

Why processes: math-verify / sympy can spend minutes (or all memory) in C code on a completion like
``\\boxed{9^{9^{9^{9}}}}``. SIGALRM deadlines work only on the main thread, cannot interrupt C code, and a
reward's own SIGALRM use cancels them; a process can always be killed. The pool

- starts lazily (first item that needs math-verify) a zygote: a fresh interpreter (``python -c`` running the
  file ``rewards/_grader_child.py``, which holds the zygote's and the workers' code: no re-import of the
  trainer's ``__main__`` as multiprocessing's spawn does, no import of the ``rewards`` package or torch) that
  imports and warms up math-verify once (seconds), then forks each worker
  on request, so a replacement worker is ready in milliseconds;
- gives each item its own deadline, counted from when a ready worker receives it; a worker past its deadline
  is SIGKILLed and replaced, the item is reported as timed out. A batch of n items that need math-verify
  returns within about ceil(n / workers) x deadline (plus the zygote's one-time start on first use);
- serves one batch at a time (a lock), from any thread; an outer deadline (``rewards.deadline``: the
  reward component's) may interrupt a batch anywhere: the pool's bookkeeping (fork a worker and read its pid,
  kill a worker and forget it, hand an item out) runs shielded from it, each fork request carries an id the
  zygote's reply echoes (a reply to an interrupted request is discarded, never taken for the next worker's
  pid), and the workers an interrupted batch left busy are killed before the next batch starts;
- pickles as its configuration only (a reward holding a pool can be pickled; the copy starts its own workers);
- forgets (does not kill) a parent's zygote and workers after ``os.fork``; is closed at interpreter exit.
  No orphans: the zygote exits when its control socket closes (the trainer closed the pool or died) and
  its workers are SIGKILLed by the kernel when it exits (PR_SET_PDEATHSIG, Linux); a worker also exits
  when its socket closes, and one stuck in C code holding the GIL hits its CPU limit (``_grader_child._WORKER_CPU_S``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

if __package__:  # rewards.math_grader: its batches may run under a reward component's deadline
    from rewards.deadline import shield
else:  # run as a file (the zygote, a test's torch-free parent): no rewards.deadline there, nothing to shield
    shield = contextlib.nullcontext

log = logging.getLogger(__name__)

Pair = tuple[str, str]  # (prediction, gold)
_POOLS: weakref.WeakSet[GraderPool] = weakref.WeakSet()
_SHARED: dict[int, GraderPool] = {}
_SHARED_LOCK = threading.Lock()
_CHILD = str(Path(__file__).with_name("_grader_child.py"))  # the zygote's and workers' code, run as a file


def default_workers() -> int:
    """min(2, usable CPUs): grading is a small share of a step; more workers only help pathological batches."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus))


class _Zygote:
    """A warmed-up math-verify process that forks workers on request: a replacement worker costs a fork
    (milliseconds), not an interpreter start and a warm-up (seconds)."""

    def __init__(self, startup_timeout_s: float) -> None:
        ours, theirs = socket.socketpair()
        pdeathsig = threading.current_thread() is threading.main_thread()
        # run the child's file, not a module of the package: importing it would import every reward (torch)
        cmd = [sys.executable, "-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')",
               _CHILD, str(theirs.fileno()), str(os.getpid()), str(int(pdeathsig))]
        with theirs:
            self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        self.ctrl = ours
        self.ctrl.settimeout(startup_timeout_s)
        self._requests = 0  # fork requests sent: each carries its number, echoed in the zygote's reply
        self._reader = ours.makefile("rb")
        ok = False
        with contextlib.suppress(OSError):
            ok = self._reader.readline() == b"ready\n"
        if not ok:
            self.close()
            raise RuntimeError(f"math grader: the worker zygote (pid {self.proc.pid}) did not start within "
                               f"{startup_timeout_s:g}s (exit code {self.proc.poll()})")

    def fork_worker(self) -> tuple[int, Connection]:
        """A new worker's pid and socket; OSError when the zygote is gone.

        Replies to earlier requests that were interrupted before their reply was read are skipped (their
        workers exit when they find their socket closed), so the pid returned is this request's worker's."""
        self._requests += 1
        req = self._requests
        ours, theirs = socket.socketpair()
        try:
            with theirs:
                socket.send_fds(self.ctrl, [str(req).encode()], [theirs.fileno()])
            while True:
                line = self._reader.readline()
                if not line:
                    raise OSError("the math grader zygote exited")
                got, pid = (int(x) for x in line.split())
                if got == req:
                    return pid, Connection(ours.detach())
                log.debug("math grading: skipped the zygote's reply to interrupted fork request %d", got)
        except BaseException:
            ours.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._reader.close()
            self.ctrl.close()  # EOF: the zygote exits, and its workers with it
        with contextlib.suppress(Exception):
            self.proc.wait(5)
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait(5)


def _exited(pid: int) -> bool:
    """Process ``pid`` has exited (gone, or a zombie); False where /proc cannot tell."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return Path("/proc/self").exists()
    except (OSError, IndexError):
        return False


class _Worker:
    """One worker process (forked by the zygote), its socket, and the job it holds (index, deadline) when busy."""

    def __init__(self, zygote: _Zygote) -> None:
        self.pid, self.conn = zygote.fork_worker()
        self.ready = False
        self.started = time.monotonic()
        self.job: tuple[tuple[int, int], float] | None = None  # ((batch, item index), deadline)

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            os.kill(self.pid, signal.SIGKILL)  # the zygote reaps it
        with contextlib.suppress(Exception):
            self.conn.close()


class GraderPool:
    """Worker processes for math-verify with per-item deadlines (see the module docstring).

    Args:
        workers: process count (default ``default_workers()``).
        startup_timeout_s: a worker not ready within this is an error (a broken environment, not an item).
    """

    def __init__(self, workers: int | None = None, startup_timeout_s: float = 120.0) -> None:
        self.workers = workers or default_workers()
        if self.workers < 1:
            raise ValueError(f"math grader pool: workers must be >= 1, got {workers!r}")
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0  # workers killed (deadline) or found dead, and replaced
        self.timeouts = 0  # items that overran their deadline
        self._init_runtime()
        _POOLS.add(self)

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._workers: list[_Worker] = []
        self._zygote: _Zygote | None = None
        self._batch = 0  # batches started: a job id is (batch, item index), so a stale answer never matches

    def __getstate__(self) -> dict[str, Any]:
        return {"workers": self.workers, "startup_timeout_s": self.startup_timeout_s, "restarts": 0, "timeouts": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()
        _POOLS.add(self)

    def _check_fork(self) -> None:
        """In a forked child the zygote and workers are the parent's: drop our handles, never signal them."""
        if self._pid != os.getpid():
            for w in self._workers:
                with contextlib.suppress(Exception):
                    w.conn.close()
            if self._zygote is not None:
                with contextlib.suppress(Exception):
                    self._zygote._reader.close()
                    self._zygote.ctrl.close()
            self._workers, self._zygote = [], None
            self._pid = os.getpid()

    def _fill(self) -> None:
        """Start workers up to ``workers`` (and the zygote first, or again if it died). A fork and its
        bookkeeping run shielded from deadlines; a zygote's start (seconds, first use) does not."""
        while len(self._workers) < self.workers:
            if self._zygote is None:
                self._zygote = _Zygote(self.startup_timeout_s)
            try:
                with shield():
                    self._workers.append(_Worker(self._zygote))
            except OSError:  # the zygote died (killed from outside): one new one, then a real error
                log.warning("math grading: the worker zygote (pid %s) is gone; starting another", self._zygote.proc.pid)
                self._zygote.close()
                self._zygote = _Zygote(self.startup_timeout_s)
                with shield():
                    self._workers.append(_Worker(self._zygote))

    def _retire(self, w: _Worker) -> None:
        """Kill ``w`` and forget it, both or neither (shielded from deadlines)."""
        with shield():
            w.kill()
            if w in self._workers:
                self._workers.remove(w)
            self.restarts += 1

    def _retire_exited(self) -> None:
        """Forget idle workers that died since the last batch (their zygote was killed, out of memory...): an item
        sent to one would be scored as if it had killed its worker."""
        for w in [w for w in self._workers if w.job is None and _exited(w.pid)]:
            log.warning("math grading: idle worker (pid %s) exited; replaced", w.pid)
            self._retire(w)

    def _retire_busy(self) -> None:
        """Kill and forget every worker holding a job: after an interrupted batch its answer is stale."""
        with shield():
            for w in [w for w in self._workers if w.job is not None]:
                self._retire(w)

    def _replace(self, w: _Worker) -> None:
        self._retire(w)
        self._fill()

    def run(self, jobs: list[list[Pair]], timeout_s: float) -> list[list[bool] | None]:
        """Verify every job's pairs; one job (an item) gets ``timeout_s`` of a worker's wall clock.

        Returns per job its list of results, or None when it overran (counted in ``timeouts``). Never raises
        for an item; raises RuntimeError only when workers cannot start at all."""
        if timeout_s <= 0:
            raise ValueError(f"math grader pool: timeout_s must be > 0, got {timeout_s!r}")
        results: list[list[bool] | None] = [None] * len(jobs)
        if not jobs:
            return results
        with self._lock:
            self._check_fork()
            self._retire_busy()  # left busy by a batch interrupted before its own cleanup ran
            self._retire_exited()
            self._fill()
            self._batch += 1
            try:
                self._dispatch(jobs, timeout_s, results)
            except BaseException:  # an outer deadline / KeyboardInterrupt: busy workers hold stale jobs
                self._retire_busy()  # no refill: the deadline has passed; the next batch refills
                raise
        return results

    def _dispatch(self, jobs: list[list[Pair]], timeout_s: float, results: list[list[bool] | None]) -> None:
        pending = list(range(len(jobs)))[::-1]  # pop() from the end = submission order
        left = len(jobs)
        while left:
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.job is None and pending:
                    i = pending.pop()
                    with shield():  # sent and recorded, or neither
                        try:
                            w.conn.send(((self._batch, i), jobs[i]))
                        except OSError:  # died while idle (its zygote was killed...): the item waits for another
                            pending.append(i)
                            self._lost(w, results, "died")
                            break  # the worker list changed
                        w.job = ((self._batch, i), now + timeout_s)
            waiting = {w.conn: w for w in self._workers if not w.ready or w.job is not None}
            due = [w.job[1] for w in waiting.values() if w.job] + [
                w.started + self.startup_timeout_s for w in waiting.values() if not w.ready]
            for conn in wait(list(waiting), timeout=max(0.0, min(due, default=now) - time.monotonic())):
                w = waiting[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):  # the worker died (killed from outside, out of memory...)
                    left -= self._lost(w, results, "died")
                    continue
                if msg[0] == "ready":
                    w.ready = True
                elif w.job is not None and msg[0] == w.job[0]:
                    results[msg[0][1]] = msg[1]
                    w.job = None
                    left -= 1
            now = time.monotonic()
            for w in list(self._workers):
                if w.job is not None and now >= w.job[1]:
                    left -= self._lost(w, results, f"overran its {timeout_s:g}s deadline")
                elif not w.ready and now >= w.started + self.startup_timeout_s:
                    raise RuntimeError(f"math grader worker (pid {w.pid}) did not start within "
                                       f"{self.startup_timeout_s:g}s")

    def _lost(self, w: _Worker, results: list[list[bool] | None], why: str) -> int:
        """Kill and replace ``w``; its job (if any) scores None. Returns how many jobs ended (0 or 1)."""
        ended = 0
        if w.job is not None:
            i = w.job[0][1]
            results[i] = None
            self.timeouts += 1
            ended = 1
            log.warning("math grading: item %d %s; its worker (pid %s) is killed and replaced", i, why, w.pid)
        elif w.ready:
            log.warning("math grading: idle worker (pid %s) %s; replaced", w.pid, why)
        else:
            raise RuntimeError(f"math grader worker (pid {w.pid}) exited while starting")
        self._replace(w)
        return ended

    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and diagnostics)."""
        return [w.pid for w in self._workers]

    def zygote_pid(self) -> int | None:
        """Process id of the zygote that forks the workers (None before the first start)."""
        return self._zygote.proc.pid if self._zygote is not None else None

    def close(self) -> None:
        """Stop every worker (ask, then kill); the pool can be used again (it restarts lazily)."""
        with self._lock:
            if self._pid != os.getpid():
                self._check_fork()
                return
            for w in self._workers:
                with contextlib.suppress(Exception):
                    w.conn.send(None)
            for w in self._workers:
                w.kill()
            if self._zygote is not None:
                self._zygote.close()
            self._workers, self._zygote = [], None


def shared_pool(workers: int | None = None) -> GraderPool:
    """The process-wide pool with ``workers`` processes (one per distinct count), created on first use."""
    n = workers or default_workers()
    with _SHARED_LOCK:
        if n not in _SHARED:
            _SHARED[n] = GraderPool(n)
        return _SHARED[n]


def _close_all() -> None:
    for pool in list(_POOLS):
        with contextlib.suppress(Exception):
            pool.close()


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._lock = threading.Lock()  # a lock held by another thread at fork time would never be released
        pool._check_fork()


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
