"""Code-execution reward: run a completion's code against the item's tests in a sandboxed subprocess.

    reward = CodeExecution(mode="pass")                          # or "fraction" of tests passed
    reward(["```python\\ndef add(a, b):\\n    return a + b\\n```"], test_list=[["assert add(1, 2) == 3"]])
    -> [1.0]

Code is the last fenced block of the completion (```python ... ```). Tests come from the dataset columns:
HumanEval (``test`` defining ``check(candidate)``, ``entry_point``; each top-level statement of ``check``
that asserts is one test) or MBPP (``test_list`` asserts, ``test_imports``, ``test_setup_code``).

Each program runs in ``python -I -S`` with its own temporary directory as the working directory, CPU-time,
memory and file-size rlimits, a wall-clock timeout, a fresh network namespace, an unprivileged uid of its own
(when the trainer runs as root; leased machine-wide with a lock file per uid, ``rewards/_uids.py``, so trainer
processes on one node never share one), Landlock (reads only the stdlib without site-packages, the system's
shared libraries and its directory; writes only in its directory; no execve, no TCP, no signals out; also for
a non-root trainer), an audit hook that refuses sockets, processes, signals and writes outside the temporary
directory (see ``rewards/_sandbox_child.py``). The result comes back on a pipe with a per-run secret and
counts only after a clean exit. Afterwards its process group and every process of its uid are killed and the
directory removed. A thread pool runs a batch in parallel.

Judging: a test that is one ``assert`` (every MBPP test; HumanEval's except six items' loops and helper
statements) is judged in the trainer (``rewards/_judge.py``): the sandbox evaluates only the candidate's
sub-expressions (``candidate(3)``) and returns their values; the expected values never enter its process, so
rewriting the harness (``gc.get_objects()``, frames, the report) gains nothing a function returning those
values would not. Known limit: the other tests run and are judged inside the candidate's interpreter, where
code written to defeat the checker (rewriting the job, patched builtins, the harness's frames) can pass them;
a returned object that is not a builtin value keeps only its truth value (its ``__eq__`` is not consulted).
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rewards._judge import Judged, candidate_names, passes, setup_names, split_test
from rewards._uids import kill_uid, leased_uid
from rewards.base import register_reward

log = logging.getLogger(__name__)
_CHILD = (Path(__file__).parent / "_sandbox_child.py").read_text()
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str | None:
    """The last fenced code block (python or untagged), or None when the completion has none."""
    blocks = [body for lang, body in _FENCE.findall(completion) if lang.lower() in ("", "python", "py", "python3")]
    return blocks[-1] if blocks else None


@dataclass
class TestSpec:
    """What to run after the candidate code: setup snippets, then each test (counted separately)."""

    setup: list[str]
    tests: list[str]
    entry_point: str | None = None


def humaneval_spec(test: str, entry_point: str) -> TestSpec:
    """Split HumanEval's ``check(candidate)`` into one test per top-level statement that asserts."""
    try:
        tree = ast.parse(test)
    except SyntaxError:
        return TestSpec([test], [f"check({entry_point})"], entry_point)
    setup = [ast.unparse(n) for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "check")]
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if len(checks) != 1:
        return TestSpec([test], [f"check({entry_point})"], entry_point)
    tests: list[str] = []
    for stmt in checks[0].body:
        src = ast.unparse(stmt)
        if any(isinstance(n, ast.Assert) for n in ast.walk(stmt)):
            tests.append(src)
        elif tests:  # a statement between asserts: run it with the next test
            tests[-1] += "\n" + src
        else:
            setup.append(src)
    return TestSpec(setup, tests or [f"check({entry_point})"], entry_point)


def mbpp_spec(test_list: list[str], test_imports: list[str] | None = None, test_setup_code: str = "") -> TestSpec:
    setup = list(test_imports or []) + ([test_setup_code] if test_setup_code else [])
    return TestSpec(setup, list(test_list))


@dataclass
class ExecResult:
    passed: int
    total: int
    status: str  # ok | timeout | crashed | no_code


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0 when absent): what confines a sandbox's writes, TCP and signals
    at the kernel level even for a non-root trainer (``rewards/_sandbox_child.py``)."""
    if sys.platform != "linux":
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(int(libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1))), 0)


@functools.cache
def _warn_once(drop: bool) -> None:
    stdlib = sysconfig.get_paths()["stdlib"]
    if drop and not _world_readable(stdlib):
        log.warning("code sandbox: the per-program uid cannot read the Python standard library at %s (a parent "
                    "directory is private); solutions can import only the modules preloaded by "
                    "rewards/_sandbox_child.py. A Python installed outside a private home lifts this.", stdlib)
    if not drop and not landlock_abi():
        log.warning("code sandbox: no Landlock in this kernel and no per-program uid (the trainer is not root): "
                    "only the Python audit hook guards files outside the working directory")


def _world_readable(path: str) -> bool:
    """Whether any uid can list ``path`` and traverse every directory above it."""
    p = Path(path).resolve()
    try:
        modes = [q.stat().st_mode for q in (p, *p.parents)]
    except OSError:
        return False
    return bool(modes[0] & stat.S_IROTH) and all(m & stat.S_IXOTH for m in modes)


class Sandbox:
    """Runs programs in confined subprocesses; safe to call from several threads at once."""

    def __init__(
        self, timeout_s: float = 10.0, cpu_s: int = 10, memory_mb: int = 1024, file_mb: int = 16, nproc: int = 16,
        network_namespace: bool = True, drop_privileges: bool = True, base_uid: int = 61000,
        uid_span: int = 1000,
    ) -> None:
        self.timeout_s, self.cpu_s, self.memory_mb, self.file_mb, self.nproc = timeout_s, cpu_s, memory_mb, file_mb, nproc
        self.netns = network_namespace and sys.platform == "linux"
        self.root = os.geteuid() == 0
        self.drop = drop_privileges and self.root
        self.base_uid, self.uid_span = base_uid, uid_span
        _warn_once(self.drop)

    @contextlib.contextmanager
    def _uid(self) -> Iterator[int | None]:
        """A uid of this program's own, leased machine-wide (``rewards/_uids.py``): NPROC limits and the final
        kill of every process of the uid then reach this program only, not another trainer process's."""
        if not self.drop:
            yield None
            return
        with leased_uid(self.base_uid, self.uid_span) as uid:
            yield uid

    def run(self, code: str, spec: TestSpec) -> ExecResult:
        with self._uid() as uid:
            return self._run(code, spec, uid)

    def _run(self, code: str, spec: TestSpec, uid: int | None) -> ExecResult:
        nonce = secrets.token_hex(16)
        plan = plan_tests(spec, code)
        read_end, write_end = os.pipe()
        try:  # room for the test values: the program writes its report before the trainer reads it
            cap = fcntl.fcntl(write_end, 1031, 1 << 20) - 4096  # F_SETPIPE_SZ
        except OSError:
            cap = (1 << 16) - 4096
        tests = [{"holes": j.holes} if j else {"src": t} for t, j in zip(spec.tests, plan, strict=True)]
        job = {"code": code, "setup": spec.setup, "tests": tests, "entry_point": spec.entry_point,
               "cpu_s": self.cpu_s, "memory_mb": self.memory_mb, "file_mb": self.file_mb, "nproc": self.nproc,
               "netns": self.netns, "uid": uid, "nonce": nonce, "result_fd": write_end, "result_cap": cap}
        work = tempfile.mkdtemp(prefix="rl_small_sbx_")
        if uid is not None:
            os.chown(work, uid, uid)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
        try:
            proc = subprocess.Popen(  # output goes nowhere: a program printing gigabytes costs only its CPU time
                [sys.executable, "-I", "-S", "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, cwd=work, env=env, start_new_session=True, pass_fds=(write_end,),
            )
        except BaseException:
            os.close(read_end)
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            os.close(write_end)
        status = "ok"
        try:
            proc.communicate(json.dumps(job).encode(), timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            _kill(proc.pid, uid)
            proc.wait()
        try:  # what the sandbox wrote to the pipe as its last act, with this run's secret, then a clean exit
            if status == "timeout":  # whatever it wrote before running out of time does not count
                return ExecResult(0, len(spec.tests), status)
            res = json.loads(_read_all(read_end, limit=cap + 4096))
            if proc.returncode != 0 or not secrets.compare_digest(str(res["nonce"]), nonce):
                return ExecResult(0, len(spec.tests), "crashed")
            return ExecResult(_score(plan, res), len(spec.tests), status)
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return ExecResult(0, len(spec.tests), "crashed")
        finally:
            os.close(read_end)
            shutil.rmtree(work, ignore_errors=True)


def plan_tests(spec: TestSpec, code: str = "") -> list[Judged | None]:
    """Per test, its trainer-judged form (``rewards/_judge.py``) or None when it runs inside the sandbox."""
    forbidden, shadowed = setup_names(spec.setup), candidate_names(code)
    return [split_test(t, forbidden, shadowed) for t in spec.tests]


def _score(plan: list[Judged | None], res: dict[str, Any]) -> int:
    """Tests passed: the sandbox's count of the tests it judged (at most their number), plus the trainer-judged
    tests whose returned values satisfy their templates here."""
    in_sandbox = sum(j is None for j in plan)
    values = res.get("values")
    values = values if isinstance(values, list) else []
    judged = [j for j in plan if j is not None]
    ok = sum(passes(j, values[k]) for k, j in enumerate(judged) if k < len(values))
    return min(int(res["passed"]), in_sandbox) + ok


def _read_all(fd: int, limit: int) -> bytes:
    """What is in the pipe now (its writers are dead), at most ``limit`` bytes; never blocks."""
    os.set_blocking(fd, False)
    out = b""
    while len(out) < limit:
        try:
            chunk = os.read(fd, limit - len(out))
        except BlockingIOError:
            break
        if not chunk:
            break
        out += chunk
    return out


def _kill(pgid: int, uid: int | None) -> None:
    """Kill the program's process group and, when it ran under its own uid, every process of that uid."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:  # the uid is leased to this program alone: its processes are this program's
        kill_uid(uid)


def item_specs(n: int, **cols: Any) -> list[TestSpec | None]:
    """Per-item test specs from HumanEval (test, entry_point) or MBPP (test_list, ...) columns."""
    specs: list[TestSpec | None] = []
    for i in range(n):
        get = lambda k, i=i: cols[k][i] if cols.get(k) is not None else None
        if get("test") and get("entry_point"):
            specs.append(humaneval_spec(get("test"), get("entry_point")))
        elif get("test_list"):
            specs.append(mbpp_spec(get("test_list"), get("test_imports"), get("test_setup_code") or ""))
        else:
            specs.append(None)
    return specs


@register_reward("code_execution")
class CodeExecution:
    """1.0 when every test passes (``mode: pass``) or the fraction passed (``mode: fraction``); 0 for a
    completion without a code block or whose program crashes or times out; None for an item with no tests."""

    def __init__(
        self, mode: Literal["pass", "fraction"] = "pass", workers: int | None = None, timeout_s: float = 10.0,
        cpu_s: int = 10, memory_mb: int = 1024, network_namespace: bool = True, drop_privileges: bool = True,
    ) -> None:
        if mode not in ("pass", "fraction"):
            raise ValueError(f"code_execution: mode must be 'pass' or 'fraction', got {mode!r}")
        self.mode = mode
        self.workers = workers or max(os.cpu_count() or 1, 1)
        self.sandbox = Sandbox(timeout_s, cpu_s, memory_mb, network_namespace=network_namespace,
                               drop_privileges=drop_privileges)
        self.stats = {"timeout": 0, "crashed": 0, "no_code": 0, "ok": 0}
        self._lock = threading.Lock()

    def _one(self, completion: str, spec: TestSpec | None) -> float | None:
        if spec is None:
            return None
        code = extract_code(completion)
        res = ExecResult(0, len(spec.tests), "no_code") if code is None else self.sandbox.run(code, spec)
        with self._lock:
            self.stats[res.status] += 1
        if self.mode == "fraction":
            return res.passed / max(res.total, 1)
        return float(res.status == "ok" and res.passed == res.total)

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float | None]:
        specs = item_specs(len(completions), **kwargs)
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self._one, completions, specs))

    def __getstate__(self) -> dict[str, Any]:  # picklable: the lock is recreated
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def state_dict(self) -> dict[str, Any]:
        return {"stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.update(state["stats"])
