"""The math grader's processes: the zygote that warms math-verify up and forks workers, and the workers.

Run as a file by ``rewards.math_grader`` (``python -c <runpy> rewards/_grader_child.py CTRL_FD PARENT_PID
PDEATHSIG``), never imported by the trainer: a fresh interpreter that imports neither the ``rewards`` package
nor torch, only math-verify. The protocol (fork requests on the control socket, ``(job_id, pairs)`` to a
worker, ``(job_id, [bool, ...])`` back) and the reasons are in ``rewards.math_grader``'s docstring.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection

# one expression of each kind math-verify first meets slowly (seconds, cold), run before a worker says ready
_WARM_UP = [("x+x", "2x"), ("\\frac{1}{2}", "0.5"), ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), ("(1,2]", "(1,2]"),
            ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "1"), ("x^2+2x+1=0", "1"), ("\\{1,2\\}", "1"),
            ("10^\\circ", "10"), ("\\text{E}", "E"), ("3\\pi i", "e^{2}"), ("\\infty", "(-\\infty, 0)")]
_WORKER_CPU_S = 3600  # CPU seconds a worker may use in all; past it the kernel ends it and the pool replaces it


def mv_equivalent(pred: str, gold: str) -> bool:
    """math-verify's ``verify(parse(gold), parse(pred))`` (gold first, as the community does), its own
    SIGALRM timeouts off (the pool's wall clock is the deadline). Runs in a worker; any error is "not equal"."""
    from math_verify import parse, verify

    def boxed(s: str) -> str:
        return s if "\\boxed" in s else f"\\boxed{{{s}}}"

    try:
        g = parse(boxed(gold), parsing_timeout=None)  # type: ignore[arg-type]
        p = parse(boxed(pred), parsing_timeout=None)  # type: ignore[arg-type]
        return bool(g and p and verify(g, p, timeout_seconds=None))  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001  a parse failure is a wrong answer, as in math-verify itself
        return False


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the thread that started it exits (PR_SET_PDEATHSIG). The zygote asks
    for it only when started from the trainer's main thread (whose exit is the process's); every worker asks
    for it (its parent, the zygote, has one thread)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent is gone (reparented). Runs between bytecodes, so it cannot stop a C loop holding the
    GIL; the CPU limit is the last resort for that."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _serve(conn: Connection) -> None:
    """A worker's loop: receive ``(job_id, pairs)``, answer ``(job_id, [bool, ...])``; return on None or EOF."""
    try:
        conn.send(("ready", os.getpid()))
    except OSError:  # the pool dropped this worker's socket (an interrupted fork request)
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        job_id, pairs = msg
        conn.send((job_id, [mv_equivalent(p, g) for p, g in pairs]))


def _zygote_main() -> None:
    """The zygote (``python -c <run this file> FILE CTRL_FD PARENT_PID PDEATHSIG``): warm math-verify up once,
    then fork one worker per request (the request carries the worker's socket and an id; the reply is the id
    and the worker's pid); exit when the pool closes the control socket or its process dies. Its workers die
    with it (PR_SET_PDEATHSIG)."""
    fd, parent_pid, pdeathsig = (int(a) for a in sys.argv[-3:])
    if pdeathsig:
        _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it closes us
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    for pred, gold in _WARM_UP:  # first calls compile grammars and import sympy parts: not an item's time
        mv_equivalent(pred, gold)
    ctrl = socket.socket(fileno=fd)
    ctrl.sendall(b"ready\n")
    zygote = os.getpid()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctrl, 16, 1)
        except OSError:
            os._exit(0)
        if not msg or not fds:
            os._exit(0)
        pid = os.fork()
        if pid == 0:  # the worker
            ctrl.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _die_with_parent(zygote)
            threading.Thread(target=_watch_parent, args=(zygote,), daemon=True).start()
            with contextlib.suppress(Exception):
                import resource

                resource.setrlimit(resource.RLIMIT_CPU, (_WORKER_CPU_S, _WORKER_CPU_S + 5))
            try:
                _serve(Connection(fds[0]))
            finally:
                os._exit(0)
        os.close(fds[0])
        ctrl.sendall(f"{int(msg)} {pid}\n".encode())


if __name__ == "__main__":
    _zygote_main()
