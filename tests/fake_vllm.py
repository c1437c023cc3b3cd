"""A stand-in for vLLM's OpenAI server (the routes the vllm_server backend uses), for fault tests without vLLM.

In a test:  server = FakeVLLM().start(); server.url; server.hang = True; server.reset_loads = 1; server.stop()
As a process (what VLLMServer spawns when its ``python`` is a script that runs this file):
    fake_vllm.py -m vllm.entrypoints.openai.api_server --model M --port N ...   (other flags ignored)
    env FAKE_VLLM_DIE_ON_LOAD=FILE: while FILE exists, a /v1/load_lora_adapter request removes it and the
    process exits at once without answering (a server that dies during a weight sync).

Completions: ``n`` choices of ``max_tokens`` token ids 1, 2, ... with logprob -0.5 each, finish "length".
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeVLLM:
    """The server state; ``hang``: accept connections and never answer; ``reset_loads``: that many adapter
    loads are answered by closing the connection; ``delay``: seconds each completion takes."""

    def __init__(self, port: int = 0, die_on_load: str | None = None) -> None:
        self.models = {"base"}
        self.loads: list[str] = []
        self.requested: list[str] = []  # the model name of every completion request
        self.hang = False
        self.reset_loads = 0
        self.die_on_load = die_on_load
        self.completions = 0
        self.delay = 0.0  # seconds before a completion is answered (a slow server; /health stays quick)
        self._release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if fake._stall():
                    return
                if self.path == "/health":
                    self._send({})
                elif self.path == "/v1/models":
                    self._send({"data": [{"id": m} for m in sorted(fake.models)]})
                else:
                    self._send({"error": self.path}, 404)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                if fake._stall():
                    return
                if self.path == "/v1/load_lora_adapter":
                    if fake.die_on_load and os.path.exists(fake.die_on_load):
                        os.remove(fake.die_on_load)
                        os._exit(3)
                    if fake.reset_loads > 0:
                        fake.reset_loads -= 1
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()  # linger 0: the client sees a connection reset
                        return
                    fake.loads.append(body["lora_name"])
                    fake.models.add(body["lora_name"])
                    self._send({}, raw=b"Success")
                elif self.path == "/v1/unload_lora_adapter":
                    fake.models.discard(body["lora_name"])
                    self._send({}, raw=b"Success")
                elif self.path == "/v1/completions":
                    fake.requested.append(body["model"])
                    if body["model"] not in fake.models:
                        self._send({"error": f"model {body['model']} not found"}, 404)
                        return
                    if fake._release.wait(fake.delay):
                        return
                    fake.completions += 1
                    k = body["max_tokens"]
                    choices = [{"index": i, "token_ids": list(range(1, k + 1)), "finish_reason": "length",
                                "logprobs": {"token_logprobs": [-0.5] * k}} for i in range(body["n"])]
                    self._send({"choices": choices})
                else:
                    self._send({"error": self.path}, 404)

            def _send(self, obj: object, code: int = 200, raw: bytes | None = None) -> None:
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def _stall(self) -> bool:
        """While ``hang`` is set, hold the request until stop() (the client must time out)."""
        if self.hang:
            self._release.wait()
            return True
        return False

    def start(self) -> FakeVLLM:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str]) -> None:
    port = int(argv[argv.index("--port") + 1])
    FakeVLLM(port, die_on_load=os.environ.get("FAKE_VLLM_DIE_ON_LOAD")).httpd.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
