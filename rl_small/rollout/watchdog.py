"""Requests that can be aborted when their server hangs: a /health watchdog over in-flight HTTP connections.

    requests = Watchdog(urls, every=10.0)
    data = requests.post(url, "/v1/completions", body, timeout)   # ServerHung if the watchdog aborted it
    requests.close()

A vLLM server that hangs (SIGSTOPped, deadlocked, its host gone without a reset) accepts connections and answers
nothing, so a request to it would wait for its whole timeout. While requests are in flight on a server, a
daemon thread checks its /health every ``every`` seconds; after ``STRIKES`` checks in a row without an answer
it shuts the sockets of those requests down, so that they fail at once with ``ServerHung`` and are retried
(the client restarts a spawned server first). urllib hides its socket, hence http.client here.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import socket
import threading
import urllib.error
import urllib.parse
from typing import Any

from rl_small.rollout.server import healthy

log = logging.getLogger("rl_small.rollout")
STRIKES = 3  # consecutive /health checks without an answer before in-flight requests are aborted
CLOSED = "rollout backend closed"


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
