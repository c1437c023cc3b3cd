"""``VLLMServerBackend.close()`` is final (tests/fake_vllm.py servers, no vLLM): a prefetch thread still
generating when the run ends must neither restart the stopped servers nor wait for its requests' timeouts; and a
merged-weight push waits for such a prefetch; and a prefetch beside a server spawned on this CPU is warned about."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from rl_small.rollout.base import RolloutError, SamplingSpec
from rl_small.rollout.vllm_server import VLLMServerBackend
from rl_small.types import Prompt
from tests.fake_vllm import FakeVLLM
from tests.test_server_faults import _Tok


class _Owned:
    """A server this process spawned, as the backend sees it: stop() stops the fake; restart() is counted
    (a real one would start a new vLLM process)."""

    def __init__(self, fake: FakeVLLM) -> None:
        self.fake, self.url, self.restarts, self.stopped = fake, fake.url, 0, False

    def stop(self, grace: float = 30.0) -> None:
        if not self.stopped:
            self.stopped = True
            self.fake.stop()

    def restart(self) -> None:
        self.restarts += 1


def _generate_in_background(backend: VLLMServerBackend, n_prompts: int) -> tuple[ThreadPoolExecutor, Future]:
    pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")  # as Trainer._pool
    fut = pool.submit(backend.generate, [Prompt(f"p{i}", "hi", "") for i in range(n_prompts)],
                      SamplingSpec(n=2, max_new_tokens=3))
    deadline = time.monotonic() + 30
    while sum(backend._inflight.values()) < n_prompts and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(backend._inflight.values()) == n_prompts, "the requests never got in flight"
    return pool, fut


def test_close_during_generation_restarts_no_spawned_server() -> None:
    fake = FakeVLLM().start()
    fake.delay = 60.0  # the requests are in flight when the run ends
    owned = _Owned(fake)
    backend = VLLMServerBackend([fake.url], _Tok(), Path("/tmp"), [owned], request_timeout=120, max_retries=3)
    pool, fut = _generate_in_background(backend, 4)
    t0 = time.monotonic()
    backend.close()
    with pytest.raises(RolloutError, match="rollout backend closed: no more requests, retries or server restarts"):
        fut.result(timeout=60)
    pool.shutdown()
    assert owned.stopped and owned.restarts == 0 and backend.stats["restarts"] == 0
    assert time.monotonic() - t0 < 30  # not the 60 s the server would take, nor a restart's startup_timeout
    with pytest.raises(RolloutError, match="rollout backend closed"):
        backend.generate([Prompt("p", "hi", "")], SamplingSpec(n=1, max_new_tokens=3))


def test_close_aborts_requests_in_flight_on_an_external_server() -> None:
    """An external server keeps running after close(): its in-flight requests are cut off, not waited for
    (a non-daemon prefetch thread would hold interpreter exit for up to the request timeout)."""
    fake = FakeVLLM().start()
    fake.delay = 60.0
    try:
        backend = VLLMServerBackend([fake.url], _Tok(), Path("/tmp"), request_timeout=120, max_retries=3)
        pool, fut = _generate_in_background(backend, 3)
        t0 = time.monotonic()
        backend.close()
        with pytest.raises(RolloutError, match="rollout backend closed"):
            fut.result(timeout=90)
        pool.shutdown()
        assert time.monotonic() - t0 < 30 and fake.completions == 0 and backend.stats["retries"] == 0
    finally:
        fake.stop()


EXIT_SCRIPT = """
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from rl_small.rollout.base import SamplingSpec
from rl_small.rollout.vllm_server import VLLMServerBackend
from rl_small.types import Prompt
from tests.fake_vllm import FakeVLLM
from tests.test_server_faults import _Tok

fake = FakeVLLM().start()
fake.delay = 120.0
backend = VLLMServerBackend([fake.url], _Tok(), Path(sys.argv[1]), request_timeout=300)
pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")  # RolloutStream._pool: non-daemon, joined at exit
fut = pool.submit(backend.generate, [Prompt("p", "hi", "")], SamplingSpec(n=2, max_new_tokens=3))
while not sum(backend._inflight.values()):
    time.sleep(0.01)
backend.close()  # what rl_small.train does at the end, with the prefetch still running
print("closed", flush=True)
"""


def test_interpreter_exits_soon_after_close_with_a_prefetch_in_flight(tmp_path: Path) -> None:
    """The run's last step prefetched the next batch: exit must not wait for that request (120 s here)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=200, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "closed", done.stderr[-2000:]
    assert time.monotonic() - t0 < 60, "interpreter exit waited for the prefetch thread's request"


def test_a_merged_push_waits_for_the_prefetch_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """rollout.sync merged + async_generation: the full-weight reload replaces the served weights in place, so it
    must not start while the next step's rollouts are being generated (they would mix two versions)."""
    import rl_small.rollout.vllm_server as vs

    fake = FakeVLLM().start()
    fake.delay = 1.5  # each request takes 1.5 s: the prefetch is in flight when the push comes
    backend = VLLMServerBackend([fake.url], _Tok(), Path("/tmp"), [], request_timeout=60, max_retries=1)
    pushed: list[float] = []
    monkeypatch.setattr(vs, "reload_on_server", lambda url, folder: pushed.append(time.monotonic()))
    try:
        pool, fut = _generate_in_background(backend, 2)
        t0 = time.monotonic()
        backend._reload(Path("/tmp/merged-v1"))
        assert len(fut.result(timeout=30)) == 4 and len(pushed) == 1  # 2 prompts x 2 completions, then one push
        assert not any(backend._inflight.values())
        assert pushed[0] - t0 > 1.0  # it waited for the requests (started just before t0, 1.5 s each)
        pool.shutdown()
    finally:
        backend.close()
        fake.stop()


def test_async_generation_with_a_server_spawned_on_this_cpu_warns(caplog: pytest.LogCaptureFixture) -> None:
    """On 2 cores the server generating during the update made steps 4-5x slower (BENCHMARKS §3b): a warning."""
    import logging
    from types import SimpleNamespace

    from rl_small.config import load_recipe
    from rl_small.rollout.stream import RolloutStream

    cfg = load_recipe(None, ["rollout.backend=vllm_server", "rollout.async_generation=true", "rollout.spawn=true"])
    backend = SimpleNamespace(thread_safe=True, spawned={"http://127.0.0.1:8000"})
    with caplog.at_level(logging.WARNING, logger="rl_small.rollout.stream"):
        RolloutStream(cfg, None, backend, None, None)  # type: ignore[arg-type]
    assert "4-5x slower" in caplog.text
    caplog.clear()
    backend.spawned = set()  # external servers: their own cores
    with caplog.at_level(logging.WARNING, logger="rl_small.rollout.stream"):
        RolloutStream(cfg, None, backend, None, None)  # type: ignore[arg-type]
    assert "slower" not in caplog.text
