"""One writer per run directory: an exclusive lock held for the process lifetime.

    lock = lock_run_dir(run_dir)      # creates the folder; RunDirError if it cannot be written or is in use

Two ``rl-small train`` processes writing into the same run directory would interleave ``metrics.jsonl`` and
mix adapters and summaries. The lock is ``fcntl.flock`` on ``<run_dir>/.lock`` (which holds the owner's pid):
the kernel releases it when the process ends, however it ends (kill -9 included), so a stale lock cannot
block a ``--resume``. In a multi-process (DDP) run only the main process (``RANK`` 0) takes it.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_NAME = ".lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used: not writable, or another live process writes into it."""


class RunLock:
    """An acquired run-directory lock; released by :meth:`release` or when the process exits."""

    def __init__(self, path: Path, handle: IO[str] | None) -> None:
        self.path, self._handle = path, handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def is_main_rank() -> bool:
    """Rank 0 of a torch.distributed / accelerate launch (or a plain single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def lock_run_dir(run_dir: Path) -> RunLock:
    """Create ``run_dir`` and take its lock (main rank only; other ranks get a no-op lock)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"cannot write the run directory {str(run_dir)!r}: {err.strerror or err} "
                          "(set train.output_dir to a writable folder)") from err
    if not is_main_rank():
        return RunLock(run_dir / LOCK_NAME, None)
    path = run_dir / LOCK_NAME
    handle = open(path, "a+")  # noqa: SIM115 - held open for the process lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirError(f"run directory {str(run_dir)!r} is in use by another process (pid {holder}); "
                          "wait for it to finish, stop it, or choose another train.run_name") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return RunLock(path, handle)
