"""Code-execution reward: extraction, test splitting, grading, and adversarial programs in the sandbox."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rewards._judge import candidate_names, passes, setup_names, split_test
from rewards._uids import leased_uid
from rewards.code import (
    CodeExecution,
    Sandbox,
    _world_readable,
    extract_code,
    humaneval_spec,
    landlock_abi,
    mbpp_spec,
)
from rl_small.config import DataConfig
from rl_small.data import load_task_rows
from tests.conftest import SHARED_DATA

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]
GOOD = "def add(a, b):\n    return a + b\n"


def fenced(code: str) -> str:
    return f"Here you go:\n```python\n{code}\n```\nDone."


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("```python\nx = 1\n```", "x = 1\n"),
        ("```\nx = 1\n```", "x = 1\n"),
        ("```python\nx = 1\n```\nthen\n```py\nx = 2\n```", "x = 2\n"),
        ("```bash\nls\n```", None),
        ("def f(): pass", None),
    ],
)
def test_extract_code_takes_last_python_block(completion: str, expected: str | None) -> None:
    assert extract_code(completion) == expected


def test_humaneval_check_split_into_one_test_per_assert() -> None:
    test = "METADATA = {}\n\ndef check(candidate):\n    x = 2\n    assert candidate(1) == 2\n    for i in range(3):\n        assert candidate(i) == i + 1\n"
    spec = humaneval_spec(test, "inc")
    assert spec.tests == ["assert candidate(1) == 2", "for i in range(3):\n    assert candidate(i) == i + 1"]
    assert spec.setup == ["METADATA = {}", "x = 2"]
    assert spec.entry_point == "inc"


def test_pass_and_fraction_scores() -> None:
    half = "def add(a, b):\n    return a + b if b != 2 else 0\n"  # fails only add(1, 2)
    comps = [fenced(GOOD), fenced(half), "no code at all", fenced("def add(a, b) return")]
    cols = {"test_list": [ADD_TESTS] * 4}
    assert CodeExecution(mode="pass")(comps, **cols) == [1.0, 0.0, 0.0, 0.0]
    frac = CodeExecution(mode="fraction")
    assert frac(comps, **cols) == pytest.approx([1.0, 2 / 3, 0.0, 0.0])
    assert frac.stats == {"ok": 3, "no_code": 1, "timeout": 0, "crashed": 0}


def test_item_without_tests_abstains() -> None:
    assert CodeExecution()([fenced(GOOD)], answer=["3"]) == [None]


def test_humaneval_and_mbpp_columns() -> None:
    he_test = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
    sq = fenced("def square(x):\n    return x * x\n")
    r = CodeExecution(mode="fraction")
    assert r([sq], test=[he_test], entry_point=["square"]) == [1.0]
    mb = fenced("def f(x):\n    return math.floor(x)\n")  # relies on the item's test_imports
    assert r([mb], test_list=[["assert f(2.5) == 2"]], test_imports=[["import math"]]) == [1.0]
    assert mbpp_spec(["assert 1"], ["import math"], "y = 1").setup == ["import math", "y = 1"]


# Scans its own memory for the job text (secret and pipe number) and writes a forged pass.
PROC_MEM = (
    "import os, re, json\n"
    "mem = open('/proc/self/mem', 'rb')\n"
    "for line in open('/proc/self/maps'):\n"
    "    span, perms = line.split()[:2]\n"
    "    if not perms.startswith('r'):\n        continue\n"
    "    lo, hi = (int(x, 16) for x in span.split('-'))\n"
    "    try:\n        mem.seek(lo)\n        chunk = mem.read(hi - lo)\n    except (OSError, ValueError, OverflowError):\n"
    "        continue\n"
    "    n = re.search(rb'\"nonce\": \"([0-9a-f]{{{{32}}}})\"', chunk)\n"
    "    fd = re.search(rb'\"result_fd\": ([0-9]+)', chunk)\n"
    "    if n and fd:\n"
    "        os.write(int(fd.group(1)), json.dumps({{{{'nonce': n.group(1).decode(), 'passed': 3, 'total': 3}}}}).encode())\n"
    "        os._exit(0)\n"
)

ADVERSARIAL = {
    "infinite_loop": "while True:\n    pass",
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "allocate_10GB": "x = bytearray(10 * 1024 ** 3)",
    "write_repo": "open({repo!r}, 'w').write('pwned')",
    "write_home": "import os\nopen(os.path.join({home!r}, 'rl_small_pwned'), 'w').write('pwned')",
    "write_tmp": "open('/tmp/rl_small_pwned', 'w').write('pwned')",
    "socket": "import socket\ns = socket.create_connection(('127.0.0.1', 22), timeout=1)",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "print_100MB": "print('x' * (100 * 1024 * 1024))\nraise SystemExit(0)",
    "exit_before_tests": "import sys\nsys.exit(0)",
    "os_exit_before_tests": "import os\nos._exit(0)",
    "subprocess": "import subprocess\nsubprocess.run(['touch', '/tmp/rl_small_pwned'])",
    "forge_result_then_hang": "open('result.json', 'w').write('{{\"passed\": 3, \"total\": 3}}')\nwhile True:\n    pass",
    "forge_result_then_exit": "open('result.json', 'w').write('{{\"passed\": 3, \"total\": 3}}')\n"
                              "import os\nos._exit(0)",
    "forge_every_fd_then_exit": "import os\nfor fd in range(3, 64):\n    try:\n"
                                "        os.write(fd, b'{{\"nonce\": \"x\", \"passed\": 3, \"total\": 3}}')\n"
                                "    except OSError:\n        pass\nos._exit(0)",
    "steal_nonce_from_proc_mem": PROC_MEM,
    # Subvert the audit hook from Python (what a non-root trainer, without the uid drop, relies on besides
    # Landlock): rebind what it calls, use a directory fd it cannot see, rebind its deny-list.
    "escape_patched_realpath": "import os\nos.path.realpath = lambda p: os.getcwd()\nopen({repo!r}, 'w').write('pwned')",
    "escape_dir_fd": "import os\nd = os.open({repo_dir!r}, os.O_RDONLY)\n"
                     "os.open('PWNED_BY_SANDBOX', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=d)",
    "escape_patched_deny_list_signal": "import sys, os\nsys.modules['__main__'].DENY_EVENTS = ()\n"
                                       "os.kill(os.getppid(), 0)",  # signal 0: only asks whether it may
}

# A wrong solution plus a trick on the harness that reports the test results: each must still score 0.
FORGED_GRADES = {
    "patched_exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None",
    "patched_os_write": "import os, re\n_w = os.write\n"
                        "os.write = lambda fd, b: _w(fd, re.sub(rb'\"passed\": [0-9]+', b'\"passed\": 3', b))",
    "patched_json": "import json\n_d = json.dumps\n"
                    "json.dumps = lambda o, **k: _d(dict(o, passed=3) if isinstance(o, dict) else o, **k)",
}
WRONG = "\ndef add(a, b):\n    return 0\n"


def _spy_work_dirs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sandbox working directories this process creates (not another test run's on the same machine)."""
    made: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def spy(*args: object, **kwargs: object) -> str:
        path = mkdtemp(*args, **kwargs)  # type: ignore[arg-type]
        if os.path.basename(path).startswith("rl_small_sbx_"):
            made.append(path)
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    return made


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_program_scores_zero_and_leaves_nothing(name: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if name == "escape_dir_fd" and os.geteuid() != 0 and not landlock_abi():
        pytest.skip("not root and no Landlock: nothing at the kernel level stops a write through a dir_fd")
    repo_file = Path(__file__).resolve().parents[1] / "PWNED_BY_SANDBOX"
    code = ADVERSARIAL[name].format(repo=str(repo_file), repo_dir=str(repo_file.parent), home=str(Path.home()))
    # The adversarial code runs first; the solution below it would pass if execution got that far.
    reward = CodeExecution(mode="pass", timeout_s=2.0, cpu_s=2)
    work_dirs = _spy_work_dirs(monkeypatch)
    t0 = time.monotonic()
    assert reward([fenced(code + "\n" + GOOD)], test_list=[ADD_TESTS]) == [0.0]
    assert time.monotonic() - t0 < 10
    assert not repo_file.exists()
    assert not (Path.home() / "rl_small_pwned").exists()
    assert not Path("/tmp/rl_small_pwned").exists()
    assert work_dirs and not [d for d in work_dirs if os.path.exists(d)]  # its working directory is removed
    assert os.getpid() > 0  # still here: the parent was not killed


@pytest.mark.parametrize("name", [n for n in sorted(ADVERSARIAL) if n.startswith(("forge", "steal", "escape"))])
def test_forgery_and_escapes_fail_without_a_separate_uid(name: str) -> None:
    if name == "escape_dir_fd" and not landlock_abi():
        pytest.skip("the audit hook cannot see dir_fd; only Landlock (absent in this kernel) stops this one")
    # Without the uid drop (a non-root trainer) Landlock and the audit hook are what keep the run's secret and
    # the files outside the working directory.
    repo_file = Path(__file__).resolve().parents[1] / "PWNED_BY_SANDBOX"
    code = ADVERSARIAL[name].format(repo=str(repo_file), repo_dir=str(repo_file.parent), home=str(Path.home()))
    reward = CodeExecution(mode="pass", timeout_s=2.0, cpu_s=2, drop_privileges=False)
    try:
        assert reward([fenced(code + "\n" + GOOD)], test_list=[ADD_TESTS]) == [0.0]
        assert not repo_file.exists()
    finally:
        repo_file.unlink(missing_ok=True)
    assert reward([fenced(GOOD)], test_list=[ADD_TESTS]) == [1.0]


def test_world_readable_needs_every_parent_traversable() -> None:
    tmp_path = Path(tempfile.mkdtemp())  # directly under /tmp: pytest's tmp_path has a private parent
    (tmp_path / "private" / "lib").mkdir(parents=True)
    tmp_path.chmod(0o755)
    (tmp_path / "private").chmod(0o700)
    assert not _world_readable(str(tmp_path / "private" / "lib"))
    (tmp_path / "private").chmod(0o711)
    assert _world_readable(str(tmp_path / "private" / "lib"))
    (tmp_path / "private" / "lib").chmod(0o711)  # traversable but not listable
    assert not _world_readable(str(tmp_path / "private" / "lib"))
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("drop", [True, False], ids=["own_uid", "same_uid"])
def test_ordinary_introspecting_code_still_runs(drop: bool) -> None:
    # namedtuple, TypeVar and Enum call sys._getframe; traceback reads frames; writing in the working
    # directory is allowed. None of it may be mistaken for an attack.
    code = (
        "import collections, enum, traceback, typing, itertools, math, re, heapq, functools, string, json\n"
        "T = typing.TypeVar('T')\n"
        "Pair = collections.namedtuple('Pair', 'a b')\nColor = enum.Enum('Color', 'RED GREEN')\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    TB = traceback.format_exc()\n"
        "open('scratch.txt', 'w').write(TB)\nassert open('scratch.txt').read() == TB\n"
        "assert heapq.nsmallest(1, [3, 1]) == [1] and math.gcd(4, 6) == 2 and re.match('a', 'ab')\n"
        "def add(a: T, b: T) -> T:\n    return Pair(a, b).a + Pair(a, b).b + (Color.RED.value - 1)\n"
    )
    reward = CodeExecution(mode="pass", timeout_s=5.0, cpu_s=5, drop_privileges=drop)
    assert reward([fenced(code)], test_list=[ADD_TESTS]) == [1.0]


@pytest.mark.skipif(not landlock_abi(), reason="without Landlock a world-readable file is readable to any uid")
@pytest.mark.parametrize("drop", [True, False], ids=["own_uid", "same_uid"])
def test_files_outside_the_working_directory_cannot_be_read(drop: bool) -> None:
    # A world-readable folder outside the sandbox stands in for the dataset: its reference solution must be
    # neither readable (to exec it) nor listable.
    key_dir = Path(tempfile.mkdtemp(prefix="answer_key_"))
    try:
        key_dir.chmod(0o755)
        (key_dir / "reference.py").write_text(GOOD)
        (key_dir / "reference.py").chmod(0o644)
        steal = (f"import os\ntry:\n    exec(open({str(key_dir / 'reference.py')!r}).read())\nexcept OSError:\n"
                 f"    add = lambda a, b: -7\ntry:\n    LISTED = os.listdir({str(key_dir)!r})\nexcept OSError:\n"
                 f"    LISTED = []\nif LISTED:\n    add = lambda a, b: a + b\n")
        reward = CodeExecution(mode="fraction", timeout_s=5.0, cpu_s=5, drop_privileges=drop)
        assert reward([fenced(steal)], test_list=[ADD_TESTS]) == [0.0]
    finally:
        shutil.rmtree(key_dir)


@pytest.mark.parametrize("drop", [True, False], ids=["own_uid", "same_uid"])
@pytest.mark.parametrize("name", sorted(FORGED_GRADES))
def test_patching_the_harness_does_not_forge_a_grade(name: str, drop: bool) -> None:
    reward = CodeExecution(mode="fraction", timeout_s=30.0, cpu_s=2, drop_privileges=drop)  # finishes: no deadline race
    assert reward([fenced(FORGED_GRADES[name] + WRONG)], test_list=[ADD_TESTS]) == [pytest.approx(2 / 3)]


# A wrong solution that finds the harness's job with gc.get_objects() and rewrites its tests so that they pass
# (old format: test sources; new: sources of the sandbox-judged tests and holes of the trainer-judged ones).
GC_REWRITE = (
    "import gc\nfor o in gc.get_objects():\n    if isinstance(o, dict) and isinstance(o.get('tests'), list):\n"
    "        for i, t in enumerate(o['tests']):\n            if isinstance(t, str):\n"
    "                o['tests'][i] = 'pass'\n            elif 'holes' in t:\n"
    "                t['holes'] = ['True'] * len(t['holes'])\n            else:\n                t['src'] = 'pass'\n"
)


@pytest.mark.parametrize("drop", [True, False], ids=["own_uid", "same_uid"])
def test_rewriting_the_job_through_gc_does_not_forge_a_grade(drop: bool) -> None:
    # The single-assert tests are judged in the trainer: the sandbox never sees the expected values, so rewriting
    # what it evaluates yields values that fail (before, this wrong solution scored 1.0).
    reward = CodeExecution(mode="pass", timeout_s=5.0, cpu_s=5, drop_privileges=drop)
    assert reward([fenced(GC_REWRITE + WRONG)], test_list=[ADD_TESTS]) == [0.0]
    assert reward([fenced(GC_REWRITE + GOOD)], test_list=[ADD_TESTS]) == [0.0]  # its holes were rewritten too


@pytest.mark.parametrize(
    ("test", "holes"),
    [
        ("assert add(1, 2) == 3", ["add(1, 2)"]),
        ("assert set(f((3, 4), (5, 4))) == set((4,))", ["f((3, 4), (5, 4))"]),
        ("assert math.isclose(f(1), 0.5, rel_tol=0.001)", ["f(1)"]),
        ("assert abs(candidate(1.5) - 0.5) < 1e-06, 'message'", ["candidate(1.5)"]),
        ("assert not is_prime(8)", ["is_prime(8)"]),
        ("assert candidate([1, 2])[0] == [f(1)][0]", ["candidate([1, 2])", "f(1)"]),
        ("assert sorted(f(x), key=lambda t: t[1]) == [(1, 2)]", ["sorted(f(x), key=lambda t: t[1])"]),
        ("assert [candidate(i) for i in range(3)] == [0, 1, 2]", ["[candidate(i) for i in range(3)]"]),
        ("for i in range(3):\n    assert candidate(i) == i", None),  # several statements: in the sandbox
        ("assert candidate(2) == helper(2)", None),  # a name from the dataset's setup code
        ("assert [x for x in f(3) if x > 1] == [2]", None),  # a comparison inside a hole would leak
        ("assert candidate(2)", ["candidate(2)"]),
        ("assert True, 'This prints if this assert fails'", []),  # HumanEval's filler: the trainer alone
    ],
)
def test_which_tests_are_judged_in_the_trainer(test: str, holes: list[str] | None) -> None:
    judged = split_test(test, setup_names(["def helper(x):\n    return x", "import math"]))
    assert (judged.holes if judged else None) == holes


def test_a_shadowed_builtin_is_the_function_under_test_only_when_the_test_names_nothing_else() -> None:
    # MBPP 126 names its solution ``sum``: ``assert sum(10, 15) == 6`` tests the candidate's sum. Shadowing ``set``
    # does not pull ``set(f(x)) == set((4,))`` into the sandbox, where the candidate would compute both sides.
    own = candidate_names("import math\nset = set\ndef sum(a, b):\n    return 0\nfor i in range(2):\n    k = i\n")
    assert own == {"set", "sum", "i", "k"}
    assert split_test("assert sum(10, 15) == 6", set(), own).holes == ["sum(10, 15)"]
    assert split_test("assert set(f(1)) == set((4,))", set(), own).holes == ["f(1)"]
    assert split_test("assert math.isclose(f(1), 0.5)", set(), own).holes == ["f(1)"]
    gcd = fenced("def sum(a, b):\n    return max(i for i in range(1, min(a, b) + 1) if a % i == 0 and b % i == 0)\n")
    assert CodeExecution(mode="fraction")([gcd], test_list=[["assert sum(10, 15) == 5", "assert sum(4, 6) == 2"]]) \
        == [1.0]


def test_trainer_judged_values_keep_python_equality() -> None:
    # What the candidate returns is rebuilt as plain builtins in the trainer; equality is Python's.
    code = (
        "import collections, enum, fractions, re\nP = collections.namedtuple('P', 'a b')\n"
        "class N(enum.IntEnum):\n    ONE = 1\n"
        "def f(k):\n    return {'nt': P(1, 2), 'counter': collections.Counter('aab'), 'frac': fractions.Fraction(1, 2),"
        " 'enum': N.ONE, 'nan': float('nan'), 'set': {1, 2}, 'fs': frozenset({3}), 'bytes': b'x', 'c': 1 + 2j,"
        " 'nested': [(1, [2.5, {'k': None}])], 'match': re.match('m', k), 'big': 2 ** 200, 'true': True}.get(k)\n"
    )
    tests = [
        "assert f('nt') == (1, 2)", "assert f('counter') == {'a': 2, 'b': 1}", "assert f('frac') == 0.5",
        "assert f('enum') == 1", "assert f('nan') != f('nan')", "assert f('set') == {2, 1}",
        "assert f('fs') == {3}", "assert f('bytes') == b'x'", "assert f('c') == 1+2j",
        "assert f('nested') == [(1, [2.5, {'k': None}])]", "assert f('match')", "assert not f('bmatch')",
        "assert f('big') == 2 ** 200", "assert f('true') is True", "assert f('nt') != [1, 2]",
        "assert f('missing') is None", "assert len(f('nested')[0][1]) == 2",
    ]
    assert all(split_test(t, set()) for t in tests)
    reward = CodeExecution(mode="fraction", timeout_s=5.0, cpu_s=5)
    assert reward([fenced(code)], test_list=[tests]) == [1.0]
    wrong = code.replace("P(1, 2)", "P(2, 1)").replace("2 ** 200", "2 ** 200 + 1")
    assert reward([fenced(wrong)], test_list=[tests]) == [pytest.approx(15 / 17)]  # nt == (1, 2) and big fail


def test_colliding_hashes_cannot_stall_the_trainer() -> None:
    # Multiples of 2**61 - 1 all hash to 0: a set of thousands of them would take the trainer minutes to build,
    # so many equal hashes are refused (the test fails) whether the set is returned or built by the template.
    collide = [["i", format(k * (2**61 - 1), "x")] for k in range(1, 200)]
    distinct = [["i", format(k, "x")] for k in range(1, 200)]
    built, returned = split_test("assert len(set(f(1))) == 199", set()), split_test("assert len(f(2)) == 199", set())
    assert passes(built, [["l", distinct]]) and passes(returned, [["S", distinct]])
    assert not passes(built, [["l", collide]]) and not passes(returned, [["S", collide]])
    assert passes(split_test("assert isinstance(f(2), set)", set()), [["S", []]])  # the real type, not the check


@pytest.mark.skipif(os.geteuid() != 0, reason="the per-program uid is used only when the trainer is root")
def test_no_sandbox_process_survives(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil  # a dependency of accelerate

    code = "import os, time\ntime.sleep(30)"
    uids: set[int] = set()
    run = Sandbox._run
    monkeypatch.setattr(Sandbox, "_run", lambda self, c, spec, uid: (uids.add(uid), run(self, c, spec, uid))[1])
    CodeExecution(timeout_s=1.0)([fenced(code)] * 2, test_list=[ADD_TESTS] * 2)
    released = time.time()
    assert uids and all(61000 <= u < 62000 for u in uids)
    # processes of the uids it leased, started while it held them (another test run on this machine may lease
    # the same uids once they are released)
    alive = [p for p in psutil.pids() if _uid(str(p)) in uids and _started(p) < released]
    assert alive == []


# One trainer process grading slow correct solutions (each sleeps a different time, so programs of the two
# processes overlap and end at different moments); prints the scores as JSON.
TWO_PROCESS_GRADER = """
import json, sys
from rewards.code import CodeExecution
sleeps = [0.1 * (i % 7) for i in range(12)]
code = "```python\\nimport time\\ntime.sleep({})\\ndef add(a, b):\\n    return a + b\\n```"
reward = CodeExecution(mode="pass", workers=4, timeout_s=60.0, cpu_s=20)
print(json.dumps(reward([code.format(s) for s in sleeps], test_list=[sys.argv[1:]] * len(sleeps))))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the per-program uid is used only when the trainer is root")
def test_two_trainer_processes_do_not_kill_each_others_programs() -> None:
    # Two processes on one machine (DDP ranks) grading at once: before uids were leased machine-wide both
    # handed out 61000, 61001, ... and one's clean-up killed the other's running program (scored 0, crashed).
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_GRADER, *ADD_TESTS], stdout=subprocess.PIPE,
                              env=env, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert [json.loads(o) for o in outs] == [[1.0] * 12, [1.0] * 12]


def test_uid_leases_are_exclusive_and_freed(tmp_path: Path) -> None:
    with leased_uid(70000, 2, str(tmp_path)) as a, leased_uid(70000, 2, str(tmp_path)) as b:
        assert {a, b} == {70000, 70001}
        assert (tmp_path / f"uid-{a}").read_text() == f"{os.getpid()}\n"  # in use: the holder's pid
        with pytest.raises(RuntimeError, match="all 2 sandbox uids 70000..70001 are in use"), \
                leased_uid(70000, 2, str(tmp_path)):
            pass
    assert (tmp_path / f"uid-{a}").read_text() == ""  # cleaned up and released
    with leased_uid(70000, 1, str(tmp_path)) as c:
        assert c == 70000


def _started(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return float("inf")


def _uid(pid: str) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return -1


def test_sandbox_reports_timeout_status() -> None:
    res = Sandbox(timeout_s=1.0, cpu_s=5).run("while True: pass", mbpp_spec(["assert True"]))
    assert (res.passed, res.total, res.status) == (0, 1, "timeout")


@pytest.mark.skipif(not (SHARED_DATA / "humaneval").exists(), reason="../shared/data/humaneval is absent")
def test_humaneval_canonical_pass_and_broken_fail() -> None:
    path = SHARED_DATA / "humaneval" / "HumanEval.jsonl.gz"
    rows, stats = load_task_rows(DataConfig(task="humaneval", path=str(path)), "test")
    assert (stats.kept, stats.skipped) == (164, 0)
    rows = rows[:20]
    good = [fenced(r["prompt"] + r["canonical_solution"]) for r in rows]
    broken = [fenced(r["prompt"] + "    raise NotImplementedError\n") for r in rows]
    cols = {"test": [r["test"] for r in rows] * 2, "entry_point": [r["entry_point"] for r in rows] * 2}
    scores = CodeExecution()(good + broken, **cols)
    assert scores == [1.0] * 20 + [0.0] * 20


@pytest.mark.skipif(not (SHARED_DATA / "mbpp").exists(), reason="../shared/data/mbpp is absent")
def test_mbpp_task_splits_by_task_id() -> None:
    path = str(SHARED_DATA / "mbpp" / "sanitized-mbpp.json")
    test_rows, _ = load_task_rows(DataConfig(task="mbpp", path=path), "test")
    train_rows, _ = load_task_rows(DataConfig(task="mbpp", path=path), "train")
    assert all(11 <= r["task_id"] <= 510 for r in test_rows)
    assert all(601 <= r["task_id"] <= 974 for r in train_rows)
    assert len(test_rows) + len(train_rows) < 427 and len(test_rows) > 200
    assert "Your code should pass this test:\nassert" in test_rows[0]["question"]
    sample = test_rows[:10]
    scores = CodeExecution()(
        [fenced(r["code"]) for r in sample], test_list=[r["test_list"] for r in sample],
        test_imports=[r["test_imports"] for r in sample],
    )
    assert scores == [1.0] * 10


def test_malformed_code_rows_skipped_and_counted(tmp_path: Path) -> None:
    good = {"task_id": "HumanEval/0", "prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n",
            "entry_point": "f", "canonical_solution": "    return 1\n"}
    lines = [json.dumps(good), json.dumps({**good, "test": ""}), "{not json"]
    path = tmp_path / "test.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    rows, stats = load_task_rows(DataConfig(task="humaneval", path=str(path)), "test")
    assert (len(rows), stats.kept, stats.skipped) == (1, 1, 2)


@pytest.mark.skipif(not (SHARED_DATA / "humaneval").exists(), reason="../shared/data/humaneval is absent")
def test_code_task_held_out_eval_uses_the_code_grader(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from rewards import build_reward
    from rl_small.data import build_prompts
    from rl_small.data.registry import TASKS
    from rl_small.eval import evaluate
    from rl_small.rollout.fake import FakeBackend

    cfg = DataConfig(task="humaneval", path=str(SHARED_DATA / "humaneval" / "HumanEval.jsonl.gz"), template="code")
    rows, _ = load_task_rows(cfg, "test", limit=2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = build_prompts(rows, tok, cfg)
    assert "```python" in prompts[0].text and "one ```python code block" in prompts[0].text
    # The fake backend answers prompt 0 with its canonical solution and prompt 1 with a broken one.
    scripted = [fenced(rows[0]["prompt"] + rows[0]["canonical_solution"]), fenced("def nothing(): pass")]
    grader = build_reward(TASKS["humaneval"].grader)
    result = evaluate(FakeBackend(tok, scripted), prompts, grader, max_new_tokens=8)
    assert (result.n, result.accuracy) == (2, 0.5)
    assert [s["correct"] for s in result.samples] == [True, False]
