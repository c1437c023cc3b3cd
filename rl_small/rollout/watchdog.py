"""Requests that can be aborted when their server hangs: a /health watchdog over in-flight HTTP connections.

    requests = Watchdog(urls, every=10.0)
    data = requests.post(url, "/v1/completions", body, timeout)   # ServerHung if the watchdog aborted it
    requests.close()

A vLLM server that hangs (SIGSTOPped, deadlocked, its host gone without a reset) accepts connections and answers
nothing, so a request to it would wait for its whole timeout. While requests are in flight on a server, a
daemon thread checks its /health every ``every`` seconds; after ``STRIKES`` checks in a row without an answer
it shuts the sockets of those requests down, so that they fail at once with ``ServerHung`` and are retried
(the client restarts a spawned server first). urllib hides its socket, hence http.client here.

The waits of vllm_server.py live here too: ``wait_ready`` (every server healthy at start), ``wait_back`` (an
external server that went down), ``push_recovering`` (a weight load that met a dead server).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from rl_small.rollout.base import RolloutError
from rl_small.rollout.server import PROGRESS_EVERY_S, describe_error, healthy, probe

log = logging.getLogger("rl_small.rollout")
STRIKES = 3  # consecutive /health checks without an answer before in-flight requests are aborted
CLOSED = "rollout backend closed"
RETRYABLE_HTTP = {404, 408, 429, 500, 502, 503, 504}  # 404: the adapter is not (yet / again) on that server
NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, OSError)


class ServerHung(ConnectionError):
    """The watchdog closed a request's connection: its server stopped answering /health."""


class Watchdog:
    """In-flight connections per server URL and the thread that aborts them when their server hangs."""

    def __init__(self, urls: list[str], every: float = 10.0) -> None:
        self.every = every
        self._conns: dict[str, set[http.client.HTTPConnection]] = {u: set() for u in urls}
        self._aborted: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def post(self, url: str, route: str, body: dict[str, Any], timeout: float) -> Any:
        """POST ``body`` as JSON and return the JSON answer; HTTP errors raise ``urllib.error.HTTPError``,
        an aborted request ``ServerHung``, other failures the network error (all OSError subclasses)."""
        self._start()
        parts = urllib.parse.urlsplit(url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
        with self._lock:
            self._conns[url].add(conn)
        try:
            conn.connect()
            if self._closed.is_set():  # closed while connecting: close() may have seen no socket to shut down
                raise ServerHung(f"{CLOSED}: request not sent")
            conn.request("POST", parts.path + route, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status >= 400:
                raise urllib.error.HTTPError(url + route, resp.status, resp.reason, resp.headers, io.BytesIO(data))
            return json.loads(data)
        except (OSError, http.client.HTTPException) as err:
            if conn in self._aborted:
                why = CLOSED if self._closed.is_set() else f"no answer to /health for {STRIKES} checks"
                raise ServerHung(f"{why}: request aborted") from err
            if isinstance(err, http.client.HTTPException) and not isinstance(err, OSError):
                raise ConnectionError(f"{type(err).__name__}: {err}") from err
            raise
        finally:
            with self._lock:
                self._conns[url].discard(conn)
                self._aborted.discard(conn)
            conn.close()

    def close(self) -> None:
        """Stop watching and abort every request in flight (they fail at once with ``ServerHung``); later
        requests are refused: a backend being closed must not wait for its requests' timeouts."""
        with self._lock:
            self._closed.set()
            busy = [c for conns in self._conns.values() for c in conns]
        self._abort(busy)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._watch, name="vllm-watchdog", daemon=True)
                self._thread.start()

    def _watch(self) -> None:
        strikes = dict.fromkeys(self._conns, 0)
        while not self._closed.wait(self.every):
            for url in self._conns:
                with self._lock:
                    busy = list(self._conns[url])
                if not busy or healthy(url, timeout=self.every):
                    strikes[url] = 0
                    continue
                strikes[url] += 1
                if strikes[url] < STRIKES:
                    continue
                strikes[url] = 0
                log.warning("vLLM server %s has not answered /health for %d checks (%.0f s apart) with %d requests in "
                            "flight: aborting them", url, STRIKES, self.every, len(busy))
                self._abort(busy)

    def _abort(self, conns: list[http.client.HTTPConnection]) -> None:
        """Shut the sockets of ``conns`` down: their requests fail at once (marked aborted for ``post``)."""
        for conn in conns:
            with self._lock:
                self._aborted.add(conn)
            if conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)


def wait_ready(urls: Iterable[str], spawned: set[str], connect_grace: float, timeout: float) -> None:
    """Wait until every server answers /health: a line every PROGRESS_EVERY_S s; an external URL (not in
    ``spawned``) that refuses connections for ``connect_grace`` s, or any URL still failing after ``timeout`` s,
    is an error."""
    t0 = last_log = time.monotonic()
    hint = "is it running? start one with `rl-small serve --recipe R` or set rollout.spawn: true"
    for url in urls:
        refused_since: float | None = None
        while (error := probe(url)) is not None:
            now = time.monotonic()
            refused = error == "connection refused" and url not in spawned
            refused_since = (refused_since or now) if refused else None
            if refused_since is not None and now - refused_since >= connect_grace:
                raise RolloutError(f"vLLM server {url} refuses connections ({now - refused_since:.0f} s, "
                                   f"rollout.connect_grace_s={connect_grace:g}): {hint}")
            if now - t0 > timeout:
                raise RolloutError(f"vLLM server {url} not healthy after {timeout:.0f} s (last error: {error}): "
                                   f"{hint}")
            if now - last_log >= PROGRESS_EVERY_S:
                last_log = now
                log.warning("waiting for vLLM server %s: %.0f s of %.0f, last error: %s", url, now - t0,
                            timeout, error)
            time.sleep(1.0)


def wait_back(url: str, since: float, grace: float, pause: float = 1.0) -> bool:
    """Sleep ``pause`` s, then poll ``url``'s /health until it answers or ``grace`` s have passed since
    ``since`` (its first failure), logging progress; True when it answers."""
    time.sleep(pause)
    last_log = time.monotonic()
    while (error := probe(url)) is not None:
        now = time.monotonic()
        if now - since >= grace:
            return False
        if now - last_log >= PROGRESS_EVERY_S:
            last_log = now
            log.warning("vLLM server %s is down for %.0f s (grace %.0f s): %s", url, now - since, grace, error)
        time.sleep(1.0)
    return True


def push_recovering(client: Any, url: str, what: str, push: Callable[[str], None]) -> None:
    """``push(url)`` loads ``what`` (an adapter, merged weights) into the server of ``client``
    (a VLLMServerBackend); a network failure is a server that died or hangs: a spawned one is restarted
    (``client._recover`` also gives it the current weights), an external one retried with backoff within
    ``client.connect_grace`` seconds of the first failure; then the error names the server."""
    t0, last, attempt = time.monotonic(), "", 0
    for attempt in range(client.max_retries + 1):
        try:
            push(url)
            return
        except NETWORK_ERRORS as err:
            if isinstance(err, urllib.error.HTTPError) and err.code not in RETRYABLE_HTTP:
                raise
            last = f"HTTP {err.code}" if isinstance(err, urllib.error.HTTPError) else describe_error(
                getattr(err, "reason", err))
        with client._lock:
            client.stats["sync_retries"] += 1
        log.warning("loading %s into %s failed (%s), attempt %d of %d", what, url, last, attempt + 1,
                    client.max_retries + 1)
        if attempt == client.max_retries:
            break
        if url in client.servers:
            client._recover(url)
        elif not wait_back(url, t0, client.connect_grace, pause=min(2.0**attempt, 30.0)):
            break
    raise RolloutError(f"vLLM server {url} could not load {what} after {attempt + 1} attempts "
                       f"({time.monotonic() - t0:.0f} s; last error: {last}); is it running?")
