"""``VLLMServer.reap_stale`` signals only the process group it found running our server: no SIGKILL once that
group has exited (its id may already name an unrelated new group). os.killpg and /proc are faked."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from rl_small.rollout import server as server_mod
from rl_small.rollout.server import VLLMServer

PGID = 4242


def _reap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, members_after_term: Callable[[int], list[int]],
          ours: bool = True) -> list[tuple[int, int]]:
    """Run reap_stale on a pid file naming PGID, whose group is [PGID, PGID + 1] until SIGTERM and then
    ``members_after_term(calls since)``; returns the (pgid, signal) pairs sent."""
    sent: list[tuple[int, int]] = []
    polls = [0]

    def members(pgid: int) -> list[int]:
        assert pgid == PGID
        if not sent:
            return [PGID, PGID + 1]
        polls[0] += 1
        return members_after_term(polls[0])

    monkeypatch.setattr(server_mod, "group_members", members)
    monkeypatch.setattr(server_mod, "our_server_group", lambda pgid, port: ours and not sent)
    monkeypatch.setattr(server_mod.os, "killpg", lambda pgid, sig: sent.append((pgid, sig)))
    server = VLLMServer(model=str(tmp_path), port=8100, log_path=tmp_path / "vllm_server_8100.log")
    assert server.pid_path is not None
    server.pid_path.write_text(json.dumps({"pgid": PGID, "port": 8100}))
    server.reap_stale(grace=1.0)
    assert not server.pid_path.exists()
    return sent


def test_group_that_exits_on_sigterm_gets_no_sigkill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _reap(tmp_path, monkeypatch, lambda n: [PGID + 1] if n < 3 else []) == [(PGID, signal.SIGTERM)]


def test_reused_group_id_is_not_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our group exited and a new session leader got pid PGID (not our server's command): its group's other
    members are new pids."""
    assert _reap(tmp_path, monkeypatch, lambda n: [PGID, 7001, 7002]) == [(PGID, signal.SIGTERM)]


def test_group_that_ignores_sigterm_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Part of our group outlives the grace (a vLLM engine process that ignores SIGTERM): SIGKILL follows."""
    sent = _reap(tmp_path, monkeypatch, lambda n: [PGID + 1] if n < 8 else [])
    assert sent == [(PGID, signal.SIGTERM), (PGID, signal.SIGKILL)]


def test_group_running_something_else_is_not_signalled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _reap(tmp_path, monkeypatch, lambda n: [], ours=False) == []
