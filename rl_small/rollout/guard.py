"""Run a command and stop its whole process group when the parent process dies (``kill -9`` included).

    python guard.py PARENT_PID CMD [ARGS...]      # started by VLLMServer.start in a new session

The guard is the leader of its own process group (``start_new_session``) and the command its child, so the
vLLM server and its engine processes share the guard's group. Every ``POLL_S`` seconds the guard checks that its
parent is still ``PARENT_PID``; once the parent is gone (the guard was reparented to init or a subreaper) it sends
SIGTERM to the group and SIGKILL after ``GRACE_S`` seconds. It exits with the command's exit code (128 + N for
signal N), so the caller sees the server's own failure.

Why not ``prctl(PR_SET_PDEATHSIG)`` in a ``preexec_fn``: the signal fires when the *thread* that forked the
child exits, and servers are restarted from the rollout client's worker threads, which end after every
``generate``. Standard library only, run by path: the server's interpreter need not have rl_small installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

POLL_S = 0.5
GRACE_S = 10.0


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


def main(argv: list[str]) -> int:
    parent = int(argv[0])
    # SIGTERM to the group (VLLMServer.stop) reaches the command itself: wait for it to exit and pass its code on.
    # A handler (not SIG_IGN, which exec would keep) so that the command starts with the default disposition.
    signal.signal(signal.SIGTERM, lambda *_: None)
    child = subprocess.Popen(argv[1:])
    while True:
        try:
            return _exit_code(child.wait(timeout=POLL_S))
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent:
            os.killpg(0, signal.SIGTERM)
            try:
                child.wait(timeout=GRACE_S)
            finally:
                os.killpg(0, signal.SIGKILL)  # the engine processes too; this ends the guard as well


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
