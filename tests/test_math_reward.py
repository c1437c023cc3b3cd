"""Answer extraction and equivalence, as tables of inputs and expected scores."""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rewards.math import MathAccuracy, extract_answer, is_equivalent, strip_question
from rewards.math_grader import GraderPool, shared_pool

EXTRACT = [
    ("The answer is \\boxed{42}.", "boxed", "42"),
    ("first \\boxed{1} then \\boxed{2}", "boxed", "2"),  # several boxes -> the last
    ("\\boxed{\\frac{3}{4}}", "boxed", "\\frac{3}{4}"),  # nested braces kept
    ("no box here 17", "boxed", None),
    ("\\boxed{12", "boxed", None),  # unclosed
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "gsm8k", "72"),
    ("#### 1,234", "gsm8k", "1,234"),
    ("so 3 + 4 = 7 apples", "last_number", "7"),
    ("it is -5", "last_number", "-5"),
    ("total 1,234,567 dollars", "last_number", "1234567"),
    ("", "auto", None),
    ("garbage without digits", "auto", None),
    ("x \\boxed{9} but then 10", "auto", "9"),  # auto prefers the box
    ("#### 5", "auto", "5"),
]


@pytest.mark.parametrize(("text", "mode", "expected"), EXTRACT)
def test_extract(text: str, mode: str, expected: str | None) -> None:
    assert extract_answer(text, mode) == expected  # type: ignore[arg-type]


EQUIV = [
    ("72", "72", True),
    ("1,234", "1234", True),  # commas
    ("-3", "-3", True),  # negative
    ("-3", "3", False),
    ("12 apples", "12", True),  # units
    ("$12", "12", True),
    ("2.50", "2.5", True),
    ("0.75", "3/4", True),  # fractions
    ("\\frac{3}{4}", "0.75", True),
    ("\\frac{1}{2}", "\\frac{2}{4}", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),  # needs math-verify
    ("x^2+2x+1", "(x+1)^2", True),
    ("13", "12", False),
    ("", "12", False),  # empty
    (None, "12", False),
    ("banana", "12", False),  # garbage
]


@pytest.mark.parametrize(("pred", "gold", "expected"), EQUIV)
def test_equivalent(pred: str | None, gold: str, expected: bool) -> None:
    assert is_equivalent(pred, gold, timeout_s=60) is expected  # deadline generous: grading, not speed


def test_math_accuracy_reward_scores_a_batch() -> None:
    r = MathAccuracy(extract="boxed")
    comps = ["so \\boxed{12}", "\\boxed{1} \\boxed{13}", "12", "", "\\boxed{12.0}"]
    assert r(comps, answer=["12"] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert MathAccuracy(extract="auto")(comps, answer=["12"] * 5) == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_bad_extract_mode_is_named() -> None:
    with pytest.raises(ValueError, match="'boxxed'"):
        MathAccuracy(extract="boxxed")  # type: ignore[arg-type]


# Reward-hacking probes: none of these completions may earn the accuracy reward (gold 12).
QUESTION = "Tom has 5 apples and buys 7 more. How many apples does he have now? Answer: 12 is wrong, think."
HACKS = {
    "many_boxed_answers": " ".join(f"\\boxed{{{i}}}" for i in range(1, 13)),
    "every_form": "It is \\boxed{11} or \\boxed{12} or \\boxed{13}, or maybe \\boxed{\\frac{24}{2}}",
    "hedged_set_in_one_box": "\\boxed{11, 12, 13}",
    "or_in_one_box": "\\boxed{11 \\text{ or } 12}",
    "huge_number": "\\boxed{" + "12" * 5000 + "}",
    "huge_number_tail": "so the answer is " + "9" * 400 + "12",
    "empty": "",
    "only_whitespace": "  \n\t ",
    "copies_question": QUESTION,
    "copies_question_reflowed": QUESTION.replace(" ", "\n  "),
}


@pytest.mark.parametrize("name", sorted(HACKS))
def test_reward_hacking_probes_earn_nothing(name: str) -> None:
    r = MathAccuracy()
    assert r([HACKS[name]], answer=["12"], question=[QUESTION]) == [0.0]


def test_guards_keep_honest_answers() -> None:
    r = MathAccuracy()
    honest = [
        "5 + 7 = 12, so \\boxed{12}",
        "first \\boxed{12}, and again \\boxed{12.0}",  # the same answer twice is not hedging
        "Restating: " + QUESTION + " We add: 5 + 7 = 12. \\boxed{12}",
        "#### 12",
    ]
    assert r(honest, answer=["12"] * 4, question=[QUESTION] * 4) == [1.0] * 4


# Held-out grading fixes: trailing letters are units only when they are real units; scientific notation.
HELD_OUT = [
    ("2", "2n", False),  # a variable of the answer is not a unit
    ("3", "3k", False),
    ("2n", "2n", True),
    ("2", "2 n", False),
    ("2 pi", "2", False),  # a word that is maths, not a unit
    ("12 apples", "12", True),  # real units still stripped
    ("5cm", "5", True),
    ("5 \\text{ cm}", "5", True),
    ("30\\%", "30", True),
    ("4.5 \\times 10^{33}", "4.5e33", True),  # scientific notation, both ways
    ("4.5e33", "4.5 \\times 10^{33}", True),
    ("4.5 \\cdot 10^{33}", "4.5e33", True),
    ("4.5E+33", "4.5\\times10^{33}", True),
    ("-1.2 \\times 10^{-3}", "-0.0012", True),
    ("4.6 \\times 10^{33}", "4.5e33", False),
    ("4.5 \\times 10^{32}", "4.5e33", False),
]


@pytest.mark.parametrize(("pred", "gold", "expected"), HELD_OUT)
def test_held_out_grading(pred: str, gold: str, expected: bool) -> None:
    assert is_equivalent(pred, gold, timeout_s=60) is expected


def test_held_out_grading_in_a_batch() -> None:
    r = MathAccuracy(extract="boxed", item_timeout_s=60)
    comps = ["\\boxed{2}", "\\boxed{3}", "\\boxed{4.5 \\times 10^{33}}", "\\boxed{4.5e33}"]
    assert r(comps, answer=["2n", "3k", "4.5e33", "4.5 \\cdot 10^{33}"]) == [0.0, 0.0, 1.0, 1.0]


def test_question_guard_cuts_copies_and_leaves_other_text() -> None:
    q = "Find the number of positive integers n such that n^2 + 1 divides 2023 + n. Give the sum."
    assert strip_question("x " + q.replace(" ", "\n ") + " y", q) == "x   y"
    assert strip_question("so \\boxed{7}", q) == "so \\boxed{7}"
    assert strip_question("Find the number", q) == "Find the number"  # a prefix is not a copy
    assert strip_question("text 12", "short q") == "text 12"  # under 8 characters: no guard


# The grader pool: per-item deadlines in killable worker processes.
PATHOLOGICAL = "\\boxed{9^{9^{9^{9}}}}"  # sympy would compute this for minutes (and gigabytes)
SCHEDULING_ALLOWANCE_S = 10.0  # replacement forks, IPC and a loaded machine's scheduling, for the whole batch


def test_pathological_items_cost_only_themselves_even_off_the_main_thread() -> None:
    """5 pathological + 5 correct: the correct earn 1.0, the pathological 0.0 and 5 item_timeouts; the call returns
    within ceil(5 / workers) x deadline (+ an allowance), from a non-main thread (no SIGALRM there)."""
    r = MathAccuracy(extract="boxed", item_timeout_s=1.0, workers=2)
    assert r(["\\boxed{x+x}"], answer=["2x"]) == [1.0]  # the pool's one-time start is not part of the bound
    r.metrics()
    comps = [PATHOLOGICAL] * 5 + ["\\boxed{\\frac{\\sqrt{2}}{2}}"] * 5  # the correct ones need math-verify too
    out: dict[str, object] = {}

    def grade() -> None:
        t0 = time.monotonic()
        out["scores"] = r(comps, answer=["\\sqrt{2}/2"] * 10)
        out["seconds"] = time.monotonic() - t0

    bound = math.ceil(5 / 2) * 1.0 + SCHEDULING_ALLOWANCE_S
    th = threading.Thread(target=grade)
    th.start()
    th.join(bound + 30)
    assert not th.is_alive(), "grading blocked past its bound"
    assert out["scores"] == [0.0] * 5 + [1.0] * 5
    assert out["seconds"] < bound
    m = r.metrics()
    assert m["item_timeouts"] == 5.0 and m["items_verified"] == 10.0 and m["grader_restarts"] == 5.0
    assert r.metrics() == {"item_timeouts": 0.0, "items_verified": 0.0, "grader_restarts": 0.0}  # read and reset


def test_easy_items_stay_in_process() -> None:
    r = MathAccuracy(workers=1)
    assert r(["\\boxed{1,234}", "#### 5", "\\boxed{x}"], answer=["1234", "5", "x"]) == [1.0, 1.0, 1.0]
    assert r.metrics()["items_verified"] == 0.0


def test_two_threads_share_the_pool() -> None:
    r = MathAccuracy(item_timeout_s=60, workers=2)
    results: list[list[float]] = []
    threads = [threading.Thread(target=lambda: results.append(r(["\\boxed{(x+1)^2}"] * 3, answer=["x^2+2x+1"] * 3)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [[1.0] * 3, [1.0] * 3]


def test_reward_and_pool_pickle_and_work_after() -> None:
    r = MathAccuracy(item_timeout_s=60, workers=1)
    assert r(["\\boxed{(x+1)^2}"], answer=["x^2+2x+1"]) == [1.0]
    r2 = pickle.loads(pickle.dumps(r))
    assert r2(["\\boxed{(x+1)^2}", "\\boxed{x^2}"], answer=["x^2+2x+1"] * 2) == [1.0, 0.0]
    pool = GraderPool(1)
    try:
        assert pool.run([[("(x+1)^2", "x^2+2x+1")]], 60) == [[True]]
        copy = pickle.loads(pickle.dumps(pool))
        assert copy.pids() == []  # the copy starts its own workers when used
        assert copy.run([[("x", "y")]], 60) == [[False]]
        assert set(copy.pids()).isdisjoint(pool.pids())
        copy.close()
    finally:
        pool.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_pool_survives_fork() -> None:
    """A forked child gets fresh workers (never the parent's); the parent's keep working."""
    pool = GraderPool(1)
    try:
        assert pool.run([[("(x+1)^2", "x^2+2x+1")]], 60) == [[True]]
        before = pool.pids()
        pid = os.fork()
        if pid == 0:  # child: grade, then leave without running the parent's atexit handlers
            code = 1
            with contextlib.suppress(BaseException):
                ok = pool.run([[("(x+1)^2", "x^2+2x+1")]], 60) == [[True]]
                code = 0 if ok and pool.pids() and set(pool.pids()).isdisjoint(before) else 3
                pool.close()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert pool.pids() == before
        assert pool.run([[("2x", "x+x")]], 60) == [[True]]
    finally:
        pool.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


PARENT = """
import importlib.util, sys, threading
spec = importlib.util.spec_from_file_location("math_grader", sys.argv[2])  # not the package: no torch import
grader = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grader)
GraderPool = grader.GraderPool
pool = GraderPool(2)
if sys.argv[1] == "thread_busy":  # the pool started (zygote spawned) from a thread that then ends
    t = threading.Thread(target=pool.run, args=([[("x", "x")]], 60))
    t.start()
    t.join()
assert pool.run([[("(x+1)^2", "x^2+2x+1")]], 60) == [[True]]
print(pool.zygote_pid(), *pool.pids(), flush=True)
if sys.argv[1] == "exit":
    sys.stdin.readline()  # exit normally once the test has seen the processes
if sys.argv[1] == "busy":  # both workers busy in C code when the parent is killed
    pool.run([[("9^{9^{9^{9}}}", "1")], [("9^{9^{9^{9}}}", "2")]], 600)
if sys.argv[1] == "thread_busy":  # the same, the pool used from a thread
    threading.Thread(target=pool.run, args=([[("9^{9^{9^{9}}}", "1")], [("9^{9^{9^{9}}}", "2")]], 600)).start()
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("how", ["exit", "busy", "thread_busy"])
def test_no_orphan_workers(how: str) -> None:
    """The zygote and workers end with their trainer: at a normal exit (atexit), and when it is SIGKILLed while
    both workers are busy in C code, the pool started from the main thread or from a thread that has ended."""
    grader_file = str(Path(__file__).resolve().parents[1] / "rewards" / "math_grader.py")
    proc = subprocess.Popen([sys.executable, "-c", PARENT, how, grader_file], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 3 and all(_alive(p) for p in pids)  # the zygote and two workers
    proc.stdin.close()
    if how != "exit":
        time.sleep(1.0)
        proc.kill()
    proc.wait(60)
    assert _wait_gone(pids, 30) == []


REAL_SETS = [("gsm8k", "gsm8k", "test"), ("math500", "math500", "test"), ("aime24", "aime24", "test")]


@pytest.mark.parametrize(("task", "folder", "split"), REAL_SETS)
def test_real_gold_answers_grade_as_correct_against_themselves(task: str, folder: str, split: str) -> None:
    """Every gold of GSM8K test (1319), MATH-500 (500) and AIME24 (30) is correct against itself, boxed or
    bare, through the fast path and through math-verify (the pool)."""
    from rewards.math import grade_batch
    from rl_small.config import DataConfig
    from rl_small.data import load_task_rows
    from tests.conftest import SHARED_DATA

    # ../shared/data beside the checkout, or beside the folder of worktrees holding it
    data = next((d for d in (SHARED_DATA, SHARED_DATA.parents[2] / "shared" / "data") if (d / folder).exists()), None)
    if data is None:
        pytest.skip(f"{SHARED_DATA / folder} is absent")
    rows, _ = load_task_rows(DataConfig(task=task, path=str(data / folder)), split)
    golds = [str(r["answer"]) for r in rows]
    assert len(golds) == {"gsm8k": 1319, "math500": 500, "aime24": 30}[task]
    boxed = grade_batch([f"so \\boxed{{{g}}}" for g in golds], golds, "boxed", timeout_s=60)
    assert [g for g, (ok, _) in zip(golds, boxed) if not ok] == []
    bare = [is_equivalent(g, g, timeout_s=60) for g in golds]
    assert bare == [True] * len(golds)
    # math-verify itself in the worker pool (no string or number shortcut); GSM8K's are plain integers: 200 of them
    some = golds[:200]
    verified = shared_pool().run([[(g, g)] for g in some], timeout_s=60)
    assert [g for g, res in zip(some, verified) if res != [True]] == []


def test_pool_recovers_when_its_zygote_is_killed() -> None:
    pool = GraderPool(2)
    try:
        assert pool.run([[("(x+1)^2", "x^2+2x+1")]], 60) == [[True]]
        zygote, workers = pool.zygote_pid(), pool.pids()
        assert zygote is not None
        os.kill(zygote, signal.SIGKILL)  # its workers die with it (PR_SET_PDEATHSIG)
        assert _wait_gone(workers, 30) == []
        assert pool.run([[("x+x", "2x")], [("x", "y")]], 60) == [[True], [False]]
        assert pool.zygote_pid() != zygote and pool.restarts >= 1
    finally:
        pool.close()


def test_an_idle_worker_that_exited_is_replaced_before_the_next_batch() -> None:
    """A worker that exited while a copy of its socket stays open elsewhere (a process that another thread forks
    at that moment inherits it) used to be sent the next item: the send succeeded, and the item scored None at
    its deadline (seen as a flake of the zygote test on a loaded machine). Exited idle workers are now replaced
    before a batch is sent. Here the open copy is held by the test."""
    import socket
    from multiprocessing.connection import Connection

    pool = GraderPool(1)
    try:
        assert pool.run([[("x+x", "2x")]], 60) == [[True]]
        worker = pool._workers[0]
        ours, held = socket.socketpair()  # ``held``: the copy that keeps the worker's end open
        worker.conn.close()
        worker.conn = Connection(ours.detach())
        os.kill(worker.pid, signal.SIGKILL)  # the zygote reaps it
        assert _wait_gone([worker.pid], 30) == []
        assert pool.run([[("x+x", "2x")]], 3.0) == [[True]]  # was [None]: the item waited on the dead worker
        assert pool.timeouts == 0 and worker.pid not in pool.pids()
        held.close()
    finally:
        pool.close()


def test_component_keeps_the_batch_when_some_items_are_pathological() -> None:
    """Through the run's component (its batch deadline 8 s, SIGALRM on the main thread): 10 pathological items
    at 1 s each used to exhaust it (10 s) and the component abstained for all 20; now they run 4 at a time in
    the pool (about 3 s), score 0.0 and are counted, and the 10 correct answers earn 1.0."""
    from rewards.base import CombinedReward, RewardComponent

    fn = MathAccuracy(extract="boxed", item_timeout_s=1.0, workers=4)
    assert fn(["\\boxed{x+x}"], answer=["2x"]) == [1.0]  # the pool's one-time start
    fn.metrics()
    combined = CombinedReward([RewardComponent("math_accuracy", fn, timeout_s=8.0)])
    comps = [PATHOLOGICAL] * 10 + ["\\boxed{\\frac{\\sqrt{2}}{2}}"] * 10
    _, per, metrics = combined(comps, answer=["\\sqrt{2}/2"] * 20)
    assert per["math_accuracy"] == [0.0] * 10 + [1.0] * 10
    assert metrics["reward/math_accuracy/timeouts"] == 0.0 and metrics["reward/math_accuracy/abstained"] == 0.0
    timeouts = [v for k, v in metrics.items() if k.endswith("item_timeouts")]  # prefixed or not by rewards.base
    assert timeouts == [10.0]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def _live_children(ppid: int) -> set[int]:
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(int(p.name)) == ppid
            and _alive(int(p.name))}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_a_fork_request_interrupted_before_its_reply_does_not_shift_the_pids() -> None:
    """An interruption between a fork request and reading its reply (the component's deadline) used to leave
    the zygote's reply unread, so the next worker got the previous one's pid (and kill() hit the wrong
    process). Replies echo the request's id: the stale one is skipped."""
    from rewards.deadline import RewardTimeout

    pool = GraderPool(1)
    try:
        assert pool.run([[("(x+1)^2", "x^2+2x+1")]], 60) == [[True]]
        zygote = pool._zygote
        assert zygote is not None
        real = zygote._reader

        class CutOnce:  # the first readline is interrupted, as a deadline firing in the blocked read would
            cut = False

            def readline(self) -> bytes:
                if not self.cut:
                    self.cut = True
                    raise RewardTimeout("interrupted after the request was sent")
                return real.readline()

        zygote._reader = CutOnce()  # type: ignore[assignment]
        with pytest.raises(RewardTimeout):
            zygote.fork_worker()
        pid, conn = zygote.fork_worker()
        zygote._reader = real  # type: ignore[assignment]
        try:
            assert conn.poll(60)
            assert conn.recv() == ("ready", pid)  # the worker on this socket is the one whose pid we got
            assert _alive(pid) and _parent(pid) == pool.zygote_pid()
        finally:
            conn.close()
        assert pool.run([[("x+x", "2x")], [("x", "y")]], 60) == [[True], [False]]
    finally:
        pool.close()


def _cut_batches_then_grade() -> dict[str, object]:
    """4 batches of 8 pathological items (about 4 s of 1 s item deadlines on 2 workers) through a component
    whose deadline (1.5 s) cuts each one; then the pool's state and a normal batch. During the cut batches a
    fork request takes 0.3 s between sending and reading the reply (a loaded machine), so the deadline's
    refires (every 0.1 s) land in that window whenever the pool forks under an expired deadline."""
    import socket

    from rewards.base import RewardComponent

    fn = MathAccuracy(extract="boxed", item_timeout_s=1.0, workers=2)
    assert fn(["\\boxed{x+x}"], answer=["2x"]) == [1.0]  # the pool's one-time start
    comp = RewardComponent("math_accuracy", fn, timeout_s=1.5, max_consecutive_failures=0)
    send_fds = socket.send_fds

    def slow_send_fds(*args: object, **kwargs: object) -> int:
        sent = send_fds(*args, **kwargs)  # type: ignore[arg-type]
        time.sleep(0.3)
        return sent

    socket.send_fds = slow_send_fds  # type: ignore[assignment]
    try:
        cut = [comp([PATHOLOGICAL] * 8, answer=[str(i) for i in range(8)]) for _ in range(4)]
    finally:
        socket.send_fds = send_fds
    pool = shared_pool(2)
    zygote = pool.zygote_pid()
    assert zygote is not None
    end = time.monotonic() + 30  # a worker forked for an interrupted request exits when it finds its socket closed
    while time.monotonic() < end and _live_children(zygote) != set(pool.pids()):
        time.sleep(0.2)
    state = {"cut": cut, "timeouts": comp.timeouts, "pids": sorted(pool.pids()),
             "children": sorted(_live_children(zygote))}
    state["graded"] = comp(["\\boxed{(x+1)^2}", "\\boxed{x^2}", "\\boxed{\\frac{\\sqrt{2}}{2}}"],
                           answer=["x^2+2x+1", "x^2+1", "\\sqrt{2}/2"])
    state["after"] = (sorted(pool.pids()), sorted(_live_children(zygote)), pool.zygote_pid() == zygote)
    return state


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("where", ["main", "thread"])
def test_batches_cut_by_the_component_deadline_leave_the_pool_consistent(where: str) -> None:
    """The component's deadline fires inside the pool's batch, and refires every 0.1 s while the pool cleans
    up: the cleanup used to be cut too (stale jobs answered into the next batch, pids read for the wrong
    worker). Now every cut batch abstains, the pool's worker pids are exactly the zygote's live children,
    and the next batch grades correctly."""
    out: dict[str, object] = {}
    if where == "main":
        out = _cut_batches_then_grade()
    else:
        th = threading.Thread(target=lambda: out.update(_cut_batches_then_grade()))
        th.start()
        th.join(300)
    assert out["cut"] == [[None] * 8] * 4 and out["timeouts"] == 4
    assert out["pids"] == out["children"]  # busy workers of a cut batch are killed, the next batch refills
    assert out["graded"] == [1.0, 0.0, 1.0]
    pids, children, same_zygote = out["after"]  # type: ignore[misc]
    assert len(pids) == 2 and pids == children and same_zygote
