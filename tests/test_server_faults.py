"""Faults of the vllm_server backend against fake servers (tests/fake_vllm.py; no vLLM needed): a server that
dies or resets during a weight sync, servers that refuse or hang, a trainer killed with ``kill -9``, a stale
server left by an earlier run of the same folder."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rl_small.rollout import server as server_mod
from rl_small.rollout import watchdog as watchdog_mod
from rl_small.rollout.base import RolloutError, SamplingSpec
from rl_small.rollout.server import VLLMServer, group_members, healthy
from rl_small.rollout.vllm_server import VLLMServerBackend
from rl_small.types import Prompt
from tests.fake_vllm import FakeVLLM

FAKE = Path(__file__).with_name("fake_vllm.py")


class _Tok:
    """Enough of a tokenizer for the client: characters as token ids."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 256 for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter(root: Path, name: str = "adapter") -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    """An interpreter stand-in for VLLMServer: ``-m vllm.entrypoints.openai.api_server ...`` runs the fake."""
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    script.chmod(0o755)
    return str(script)


def _spawned(fake_python: str, tmp_path: Path, **kw: object) -> VLLMServer:
    return VLLMServer(model=str(tmp_path), port=_free_port(), python=fake_python, log_path=tmp_path / "srv.log",
                      startup_timeout=60, **kw)  # type: ignore[arg-type]


@pytest.fixture
def fast_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_mod, "PROGRESS_EVERY_S", 0.5)
    monkeypatch.setattr(watchdog_mod, "PROGRESS_EVERY_S", 0.5)  # wait_ready, wait_back (the client's waits)


# ---- item 5: a server that dies during a weight sync ------------------------------------------------------------
def test_spawned_server_dying_during_sync_is_restarted_and_loads_the_version(
    fake_python: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = tmp_path / "die-on-next-load"
    monkeypatch.setenv("FAKE_VLLM_DIE_ON_LOAD", str(flag))
    server = _spawned(fake_python, tmp_path)
    server.start()
    server.wait_healthy()
    backend = VLLMServerBackend([server.url], _Tok(), tmp_path / "adapters", [server], request_timeout=30)
    try:
        backend.sync(_adapter(tmp_path, "a1"), version=1)
        first_pid = server.proc.pid  # type: ignore[union-attr]
        flag.touch()  # the server exits in the middle of the next /v1/load_lora_adapter
        backend.sync(_adapter(tmp_path, "a2"), version=2)
        assert backend.stats["restarts"] == 1 and backend.stats["sync_retries"] == 1
        assert server.proc is not None and server.proc.pid != first_pid and not flag.exists()
        models = {m["id"] for m in backend._get(server.url, "/v1/models")["data"]}
        assert "v2" in models  # the restarted server serves the new version
        out = backend.generate([Prompt("p", "hi", "")], SamplingSpec(n=2, max_new_tokens=3))
        assert [r.version for r in out] == [2, 2] and out[0].completion_ids == [1, 2, 3]
    finally:
        backend.close()
    assert not healthy(server.url)


def test_external_server_resetting_a_load_is_retried() -> None:
    fake = FakeVLLM().start()
    try:
        fake.reset_loads = 2
        backend = VLLMServerBackend([fake.url], _Tok(), Path("/tmp"), connect_grace=30)
        path = Path(__file__).parent  # any folder: the fake does not read it
        backend.paths[5] = path
        backend._load_recovering(fake.url, 5)
        assert fake.loads == ["v5"] and backend.stats["sync_retries"] == 2
    finally:
        fake.stop()


def test_external_server_gone_during_sync_names_the_url_after_the_grace(tmp_path: Path) -> None:
    fake = FakeVLLM().start()
    backend = VLLMServerBackend([fake.url], _Tok(), tmp_path / "adapters", connect_grace=2.0, max_retries=10)
    backend.sync(_adapter(tmp_path, "a1"), version=1)
    fake.stop()  # the port now refuses connections
    t0 = time.monotonic()
    with pytest.raises(RolloutError, match=rf"{fake.url} could not load adapter v2 .*connection refused"):
        backend.sync(_adapter(tmp_path, "a2"), version=2)
    assert time.monotonic() - t0 < 30  # the grace (2 s) plus backoff, not max_retries x timeouts
    assert backend.version == 1  # the old version stays the one requests name


# ---- item 7: unreachable and hanging servers --------------------------------------------------------------------
def test_refused_external_url_fails_after_the_grace_with_progress(fast_progress: None,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    backend = VLLMServerBackend([url], _Tok(), Path("/tmp"), connect_grace=3.0)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rl_small.rollout"), \
            pytest.raises(RolloutError, match=rf"{url} refuses connections .*connect_grace_s=3"):
        backend.wait_ready(timeout=900)
    assert 3 <= time.monotonic() - t0 < 30
    waits = [r.getMessage() for r in caplog.records if "waiting for vLLM server" in r.getMessage()]
    assert waits and url in waits[0] and "connection refused" in waits[0]


def test_hanging_server_costs_one_request_timeout_and_the_grace(caplog: pytest.LogCaptureFixture) -> None:
    """Not 600 s x 4 attempts: the request times out (1 s here), /health does not answer either, and with no
    other server up the error comes once the grace has passed."""
    fake = FakeVLLM().start()
    fake.hang = True  # accepts connections, never answers (/health included)
    try:
        backend = VLLMServerBackend([fake.url], _Tok(), Path("/tmp"), request_timeout=1.0, max_retries=3,
                                    connect_grace=2.0, health_every=600)  # the watchdog is tested below
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="rl_small.rollout"), \
                pytest.raises(RolloutError, match=rf"{fake.url} is not answering /health \(timed out\) for \d+ s "
                                                  r"\(grace 2 s: rollout.connect_grace_s\), and no other server is up"):
            backend.generate([Prompt("p", "hi", "")], SamplingSpec(n=2, max_new_tokens=4))
        assert time.monotonic() - t0 < 40
        assert f"{fake.url}: timed out (no answer within 1 s)), attempt 1 of 4" in caplog.text
        with pytest.raises(RolloutError, match="not healthy after 2 s .*timed out"):
            backend.wait_ready(timeout=2.0)  # a hang is not "refused": waited for up to startup_timeout
    finally:
        fake.stop()


def test_auto_request_timeout_follows_tokens_in_flight() -> None:
    backend = VLLMServerBackend(["http://127.0.0.1:1"], _Tok(), Path("/tmp"))
    url = backend.urls[0]
    backend._inflight[url] = 1
    assert backend.timeout_for(url, 2, 16) == pytest.approx(60 + 0.05 * 2 * 16)
    assert backend.timeout_for(url, 2, 16, attempt=2) == pytest.approx((60 + 0.05 * 2 * 16) * 4)
    backend._inflight[url] = 4
    assert backend.timeout_for(url, 2, 512) == pytest.approx(60 + 0.05 * 2 * 512 * 4)  # 264.8 s
    fixed = VLLMServerBackend([url], _Tok(), Path("/tmp"), request_timeout=7)
    assert [fixed.timeout_for(url, 8, 512, a) for a in range(3)] == [7, 14, 28]


def test_auto_request_timeout_is_capped_counts_every_process_and_uses_the_requests_own_n() -> None:
    """64 requests of 16 x 512 tokens in flight was a 26,000 s first timeout (x 8 by the last retry): capped at
    600 s x 2^attempt; 4 processes sharing a server see 4x the requests this one has there; a greedy group of
    n=8 is split into requests of n=1, each with the budget of one completion."""
    url = "http://127.0.0.1:1"
    one = VLLMServerBackend([url], _Tok(), Path("/tmp"))
    one._inflight[url] = 64
    assert [one.timeout_for(url, 16, 512, a) for a in range(4)] == [600, 1200, 2400, 4800]
    shared = VLLMServerBackend([url], _Tok(), Path("/tmp"), world_size=4)
    shared._inflight[url] = 2
    assert shared.timeout_for(url, 1, 256) == pytest.approx(60 + 0.05 * 256 * 2 * 4)  # 162.4 s, not 85.6
    assert one.timeout_for(url, 1, 4) == pytest.approx(60 + 0.05 * 4 * 64)


def test_make_backend_tells_the_server_client_the_process_count(tmp_path: Path) -> None:
    from rl_small.config import RolloutConfig
    from rl_small.rollout import make_backend

    fake = FakeVLLM().start()
    try:
        cfg = RolloutConfig(backend="vllm_server", server_urls=[fake.url])
        backend = make_backend(cfg, None, _Tok(), run_dir=tmp_path, is_main=False, rank=1, world=4)
        assert isinstance(backend, VLLMServerBackend) and backend.world_size == 4
        backend.close()
    finally:
        fake.stop()


def test_requests_are_sent_with_the_timeout_of_their_own_n(monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy n=8: eight requests of n=1 against a fake server; each posts with the n=1 budget, not n=8's."""
    fake = FakeVLLM().start()
    sent: list[float] = []
    try:
        backend = VLLMServerBackend([fake.url], _Tok(), Path("/tmp"), max_workers=1)
        post = backend.watchdog.post
        monkeypatch.setattr(backend.watchdog, "post", lambda u, r, b, t: (sent.append(t), post(u, r, b, t))[1])
        out = backend.generate([Prompt("p", "hi", "")], SamplingSpec(n=8, max_new_tokens=100, temperature=0.0))
        assert len(out) == 8 and sent == [pytest.approx(60 + 0.05 * 100)] * 8  # one request in flight at a time
    finally:
        backend.close()
        fake.stop()


def test_spawned_server_start_logs_progress(fake_python: str, tmp_path: Path, fast_progress: None,
                                            caplog: pytest.LogCaptureFixture) -> None:
    slow = tmp_path / "slow-python"  # a server that takes 2 s to listen
    slow.write_text(f"#!/bin/sh\nsleep 2\nexec {fake_python} \"$@\"\n")
    slow.chmod(0o755)
    server = _spawned(str(slow), tmp_path)
    server.start()
    try:
        with caplog.at_level(logging.INFO, logger="rl_small.rollout"):
            server.wait_healthy()
    finally:
        server.stop()
    lines = [r.getMessage() for r in caplog.records if "waiting for the vLLM server" in r.getMessage()]
    assert lines and f"port {server.port}" in lines[0] and "connection refused" in lines[0]


# ---- item 6: servers die with the trainer; a resume replaces a stale server -------------------------------------
TRAINER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from rl_small.rollout.server import VLLMServer
    s = VLLMServer(model=sys.argv[1], port=int(sys.argv[2]), python=sys.argv[3], log_path=Path(sys.argv[4]))
    s.start(); s.wait_healthy()
    print("ready", flush=True)
    time.sleep(600)
""")


def test_server_dies_with_a_killed_trainer(fake_python: str, tmp_path: Path) -> None:
    port = _free_port()
    log_path = tmp_path / "run" / f"vllm_server_{port}.log"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(tmp_path), str(port), fake_python, str(log_path)],
                               stdout=subprocess.PIPE, env=env)
    try:
        assert trainer.stdout is not None and trainer.stdout.readline().strip() == b"ready"
        pgid = json.loads(log_path.with_suffix(".pid").read_text())["pgid"]
        assert len(group_members(pgid)) >= 2 and healthy(f"http://127.0.0.1:{port}")  # guard + server
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 20
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert group_members(pgid) == [], "the server outlived its trainer"
        assert server_mod.port_free("127.0.0.1", port)
    finally:
        trainer.kill()


def test_resume_replaces_a_stale_server_of_the_same_run(fake_python: str, tmp_path: Path) -> None:
    old = _spawned(fake_python, tmp_path)
    old.start()
    old.wait_healthy()
    assert old.proc is not None and old.pid_path is not None
    pgid = old.proc.pid
    os.kill(pgid, signal.SIGKILL)  # the guard is gone too (its trainer's whole session was killed, say)
    old.proc.wait()
    assert healthy(old.url) and group_members(pgid)  # the orphaned server still holds the port
    new = VLLMServer(model=old.model, port=old.port, python=fake_python, log_path=old.log_path, startup_timeout=60)
    new.start()  # finds the pid file, checks the group runs our server on this port, stops it
    try:
        new.wait_healthy()
        assert group_members(pgid) == [] and new.proc is not None and new.proc.pid != pgid
        assert json.loads(new.pid_path.read_text())["pgid"] == new.proc.pid  # type: ignore[union-attr]
    finally:
        new.stop()
    assert not new.pid_path.exists()  # type: ignore[union-attr]


def test_stale_pid_file_of_another_process_is_left_alone(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a group that is not a vLLM server
    try:
        server = VLLMServer(model=str(tmp_path), port=_free_port(), log_path=tmp_path / "srv.log")
        assert server.pid_path is not None
        server.pid_path.write_text(json.dumps({"pgid": other.pid, "port": server.port}))
        server.reap_stale()
        assert other.poll() is None and not server.pid_path.exists()
        server.pid_path.write_text("not json")
        server.reap_stale()
        assert not server.pid_path.exists()
    finally:
        other.kill()


def test_watchdog_aborts_requests_to_a_server_that_stops_answering(caplog: pytest.LogCaptureFixture) -> None:
    """A long request timeout (auto on a big batch) does not matter: /health goes unanswered, the watchdog
    closes the requests after 3 checks, and with no other server up the error comes after the grace."""
    fake = FakeVLLM().start()
    fake.hang = True
    try:
        backend = VLLMServerBackend([fake.url], _Tok(), Path("/tmp"), request_timeout=600, max_retries=3,
                                    connect_grace=2.0, health_every=0.5)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="rl_small.rollout"), \
                pytest.raises(RolloutError, match=rf"{fake.url} is not answering /health \(timed out\)"):
            backend.generate([Prompt(f"p{i}", "hi", "") for i in range(16)], SamplingSpec(n=2, max_new_tokens=4))
        assert time.monotonic() - t0 < 60
        assert "has not answered /health for 3 checks" in caplog.text
        assert "ServerHung: no answer to /health" in caplog.text  # the retry log names the abort
    finally:
        backend.close()
        fake.stop()


def test_other_rank_waits_for_a_restarting_spawned_server_beyond_the_grace() -> None:
    """On data-parallel rank > 0 the main process's spawned servers look external, but a restart (minutes for
    vLLM) is waited for up to startup_timeout, not connect_grace_s."""
    fake = FakeVLLM().start()
    fake.models.add("v1")
    backend = VLLMServerBackend([fake.url], _Tok(), Path("/tmp"), connect_grace=1.0, startup_timeout=60,
                                spawned={fake.url}, is_main=False)
    backend.sync(Path("/unused"), version=1)  # rank > 0: the main process loaded it
    backend.paths[1] = Path("/unused")
    fake.stop()
    box: list[FakeVLLM] = []
    revive = threading.Timer(4.0, lambda: box.append(_revived(fake.port)))
    revive.start()
    try:
        out = backend.generate([Prompt("p", "hi", "")], SamplingSpec(n=2, max_new_tokens=3))
        assert [r.version for r in out] == [1, 1] and box and box[0].completions == 1
    finally:
        revive.join()
        backend.close()
        for f in box:
            f.stop()


def _revived(port: int) -> FakeVLLM:
    fake = FakeVLLM(port).start()
    fake.models.add("v1")
    return fake


def test_slow_server_gets_a_doubled_timeout_on_retry_instead_of_a_livelock() -> None:
    """A completion that takes 2.2 s with a 2 s timeout: the first attempt times out (no answer can come before
    2.2 s), the retry (4 s: 1.8 s to spare on a loaded machine) succeeds; with a fixed timeout every retry would be
    cut off again."""
    fake = FakeVLLM().start()
    fake.delay = 2.2
    try:
        backend = VLLMServerBackend([fake.url], _Tok(), Path("/tmp"), request_timeout=2.0, max_retries=2,
                                    connect_grace=5.0)
        out = backend.generate([Prompt("p", "hi", "")], SamplingSpec(n=2, max_new_tokens=3))
        assert len(out) == 2 and backend.stats["retries"] == 1  # attempt 2 had 4 s
    finally:
        backend.close()
        fake.stop()


def test_trainer_killed_with_9_then_resumed_on_the_same_port(tiny_overrides: list[str], fake_python: str,
                                                              tmp_path: Path) -> None:
    """End to end with `python -m rl_small.train` and a spawned (fake) server: kill -9 the trainer after a
    checkpoint; its server goes with it, and `--resume` starts a new server on the same port and finishes."""
    from rl_small.checkpoint import list_checkpoints

    port = _free_port()
    over = tiny_overrides + [
        "rewards=[{name: 'tests.helpers:token_reward'}]", "rollout.backend=vllm_server", "rollout.spawn=true",
        f"rollout.server_python={fake_python}", f"rollout.port={port}", "train.steps=100", "train.save_every=1",
    ]
    run_dir = tmp_path / "t"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    trainer = subprocess.Popen([sys.executable, "-m", "rl_small.train", *over], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_file = run_dir / f"vllm_server_{port}.pid"
    try:
        deadline = time.monotonic() + 300
        while not (list_checkpoints(run_dir) and pid_file.exists()) and time.monotonic() < deadline:
            assert trainer.poll() is None, "the trainer exited before its first checkpoint"
            time.sleep(0.5)
        pgid = json.loads(pid_file.read_text())["pgid"]
        assert healthy(f"http://127.0.0.1:{port}")
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    finally:
        trainer.kill()
    deadline = time.monotonic() + 20
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_members(pgid) == [] and server_mod.port_free("127.0.0.1", port)
    step = json.loads((list_checkpoints(run_dir)[-1] / "trainer_state.json").read_text())["step"]
    resumed = subprocess.run([sys.executable, "-m", "rl_small.train", "--resume", str(run_dir),
                              f"train.steps={step + 1}"], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((list_checkpoints(run_dir)[-1] / "trainer_state.json").read_text())["step"] == step + 1
    assert not pid_file.exists() and server_mod.port_free("127.0.0.1", port)  # stopped at the end of the run
