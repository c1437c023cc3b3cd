"""Machine-wide leases on the sandbox's per-program uids, so that processes on one machine never share one.

Several trainer processes on one node (DDP ranks, two runs) each run sandboxed programs under uids from the
same range, and a program's clean-up kills every process of its uid. A uid is therefore leased before each
program: an exclusive ``flock`` on ``<lock dir>/uid-<N>``, taken without waiting (a held uid is skipped) and
held until the program's processes are dead. The kernel drops the lock when its holder dies, so a killed
trainer frees its uids; the file holds the holder's pid while a program runs and is emptied after its clean-up,
so the next holder of a non-empty file knows that processes of that uid may be left over and kills them first.
A process forked (without exec) while a program runs shares the open lock and keeps that uid unavailable until
it exits: a uid can be withheld that way, never shared.

The lock directory is ``/run/rl-small-sandbox`` (root) or ``$TMPDIR/rl-small-sandbox-<euid>``, created 0700
and refused when someone else owns it or it is open to others.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import signal
import stat
import tempfile
from collections.abc import Iterator


def lock_dir() -> str:
    """The private directory that holds the uid lock files (created on first use)."""
    euid = os.geteuid()
    candidates = ["/run/rl-small-sandbox"] if euid == 0 else []
    candidates.append(os.path.join(tempfile.gettempdir(), f"rl-small-sandbox-{euid}"))
    for path in candidates:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            continue
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == euid and not st.st_mode & 0o077:
            return path
    raise RuntimeError(f"code sandbox: no private directory for uid locks among {candidates} (each must be a "
                       f"directory owned by uid {euid} with mode 0700)")


def kill_uid(uid: int) -> None:
    """SIGKILL every process whose owner is ``uid``."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    os.kill(int(entry), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass


@contextlib.contextmanager
def leased_uid(base: int, span: int, directory: str | None = None) -> Iterator[int]:
    """A uid in ``[base, base + span)`` that no other program on this machine uses until the block exits.

    The caller kills the uid's processes before leaving the block (the lease is released after it).
    """
    directory = directory or lock_dir()
    start = secrets.randbelow(span)  # spread concurrent callers over the range: fewer lock attempts
    for k in range(span):
        uid = base + (start + k) % span
        fd = os.open(os.path.join(directory, f"uid-{uid}"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            if os.fstat(fd).st_size:  # its last holder died before its clean-up: kill what it left
                kill_uid(uid)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield uid
            os.ftruncate(fd, 0)  # reached only after the caller's clean-up: nothing of this uid is left
        finally:
            os.close(fd)  # releases the lock
        return
    raise RuntimeError(f"code sandbox: all {span} sandbox uids {base}..{base + span - 1} are in use on this "
                       f"machine (locks in {directory}); lower code_execution's workers or raise the range")
