"""Reward contract: registry, plugins, factories, keyword calls, abstention, deadlines that reward code cannot
cancel, bad outputs, runs stopped by a reward that always fails, and the sample-batch check at build time."""

from __future__ import annotations

import math
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rewards import (
    CombinedReward,
    RewardComponent,
    RewardConfigError,
    RewardError,
    RewardTimeout,
    build_reward,
    deadline,
    register_reward,
)
from rewards.deadline import shield
from rl_small.config import RecipeError, load_recipe


def test_registry_refuses_duplicate_names() -> None:
    @register_reward("test_dup_once")
    def a(completions, **kw):  # noqa: ANN001, ANN003, ANN202
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match="test_dup_once"):

        @register_reward("test_dup_once")
        def b(completions, **kw):  # noqa: ANN001, ANN003, ANN202
            return [1.0] * len(completions)


def test_unknown_reward_is_named() -> None:
    with pytest.raises(KeyError, match="no_such_reward"):
        build_reward("no_such_reward")


def test_file_plugin_with_trl_signature_and_bound_params(tmp_path: Path) -> None:
    f = tmp_path / "my_rewards.py"
    f.write_text(
        "def shorter(completions, scale=1.0, **kwargs):\n"
        "    return [scale / (1 + len(c)) for c in completions]\n"
    )
    fn = build_reward(f"{f}:shorter", {"scale": 2.0})
    assert fn(["a", "abc"]) == [1.0, 0.5]
    with pytest.raises(AttributeError, match="nope"):
        build_reward(f"{f}:nope")
    with pytest.raises(FileNotFoundError, match="missing.py"):
        build_reward(f"{tmp_path}/missing.py:f")


def test_file_inside_a_package_keeps_its_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "src" / "mypkg_rl_small_test"
    (pkg / "utils").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "utils" / "__init__.py").write_text("from .scale import SCALE\n")
    (pkg / "utils" / "scale.py").write_text("SCALE = 3.0\n")
    (pkg / "rewards.py").write_text(
        "from .utils import SCALE\n"
        "from mypkg_rl_small_test.utils.scale import SCALE as S2\n"  # absolute imports of the package work too
        "def scaled(completions, **kwargs):\n"
        "    return [SCALE * S2 * len(c) for c in completions]\n"
    )
    fn = build_reward(f"{pkg / 'rewards.py'}:scaled")
    assert fn(completions=["ab"]) == [18.0]
    assert fn.__module__ == "mypkg_rl_small_test.rewards"
    other = tmp_path / "elsewhere" / "mypkg_rl_small_test"  # a second package of that name is refused by name
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    (other / "r.py").write_text("def f(completions, **kw):\n    return [0.0]\n")
    with pytest.raises(ImportError, match="already imported from"):
        build_reward(f"{other / 'r.py'}:f")


def test_dotted_module_plugin() -> None:
    fn = build_reward("rewards.format:boxed_format")
    assert fn(["\\boxed{1}", "none"]) == [1.0, 0.0]


# ---- rewards used below ---------------------------------------------------------------------------------
def _raises(completions, **kw):  # noqa: ANN001, ANN003, ANN202
    raise RuntimeError("boom")


def _hangs(completions, **kw):  # noqa: ANN001, ANN003, ANN202
    time.sleep(30)
    return [1.0] * len(completions)


def _busy_hangs(completions, **kw):  # noqa: ANN001, ANN003, ANN202
    while True:
        pass


def _half(completions, **kw):  # noqa: ANN001, ANN003, ANN202
    return [None if i % 2 else 1.0 for i in range(len(completions))]


def _length(completions, **kw):  # noqa: ANN001, ANN003, ANN202
    return [float(len(x)) for x in completions]


def test_raising_and_hanging_rewards_abstain_are_counted_and_the_rest_still_scores() -> None:
    good = RewardComponent("good", _length, weight=2.0)
    bad = RewardComponent("bad", _raises)
    slow = RewardComponent("slow", _hangs, timeout_s=0.3)
    busy = RewardComponent("busy", _busy_hangs, timeout_s=0.3)
    combo = CombinedReward([good, bad, slow, busy])
    t0 = time.monotonic()
    totals, per, metrics = combo(["ab", "abcd"])
    assert time.monotonic() - t0 < 15  # the 0.3 s deadlines fired, not the 30 s hang; room for a loaded machine
    assert totals == [4.0, 8.0]
    assert per["bad"] == [None, None] and per["slow"] == [None, None] and per["busy"] == [None, None]
    assert metrics["reward/bad/errors"] == 1.0 and metrics["reward/slow/timeouts"] == 1.0
    assert metrics["reward/busy/timeouts"] == 1.0 and metrics["reward/slow/abstained"] == 2.0
    assert metrics["reward/good"] == 3.0
    assert (bad.errors, slow.timeouts, busy.timeouts) == (1, 1, 1)
    totals, _, _ = combo(["a"])  # the run continues: the next batch is scored again
    assert totals == [2.0] and bad.errors == 2


def test_none_abstains_from_the_sum() -> None:
    comp = RewardComponent("half", _half, weight=1.0)
    totals, _, metrics = CombinedReward([comp])(["a", "b", "c"])
    assert totals == [1.0, 0.0, 1.0]
    assert metrics["reward/half/abstained"] == 1.0 and metrics["reward/half"] == 1.0


# ---- deadlines ------------------------------------------------------------------------------------------
def test_nested_deadlines_inner_fires_outer_survives() -> None:
    with deadline(20.0):  # far from the 0.4 s inside, even on a loaded machine
        with pytest.raises(RewardTimeout):
            with deadline(0.1):
                time.sleep(1)
        time.sleep(0.3)  # the outer deadline is still armed and has not fired
    with pytest.raises(RewardTimeout):
        with deadline(0.1):
            with deadline(5.0):  # the outer, shorter deadline still applies inside
                time.sleep(1)
    time.sleep(0.3)  # nothing fires after the blocks are left


def test_deadline_works_off_the_main_thread() -> None:
    out: dict[str, Any] = {}

    def work() -> None:
        t0 = time.monotonic()
        try:
            with deadline(0.2):
                while True:  # pure Python: interrupted by an asynchronous exception
                    pass
        except RewardTimeout:
            out["took"] = time.monotonic() - t0

    t = threading.Thread(target=work)
    t.start()
    t.join(10)
    assert 0.15 < out["took"] < 5


@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_shield_defers_the_deadline_to_its_end(where: str) -> None:
    """A deadline that expires inside ``shield()`` does not interrupt it (the block runs whole, also past
    several refires); RewardTimeout is raised when the shield ends, and nested shields defer to the outermost."""
    out: dict[str, Any] = {}

    def work() -> None:
        steps = []
        t0 = time.monotonic()
        try:
            with deadline(0.2):
                with shield():
                    with shield():
                        for _ in range(8):  # 0.8 s: the deadline fires and refires (every 0.1 s) in here
                            time.sleep(0.1)
                            steps.append(1)
                    steps.append(2)  # the inner shield ended inside the outer: no raise yet
                steps.append(3)  # never reached: raised as the outer shield ended
        except RewardTimeout:
            out["took"] = time.monotonic() - t0
        out["steps"] = steps

    if where == "main":
        work()
    else:
        t = threading.Thread(target=work)
        t.start()
        t.join(30)
    assert out["steps"] == [1] * 8 + [2]
    assert 0.75 < out["took"] < 10
    with deadline(0.2):  # a shield without an expired deadline raises nothing
        with shield():
            pass
    time.sleep(0.3)


def _alarm_user(completions, **kw):  # noqa: ANN001, ANN003, ANN202
    """Calls math-verify (its SIGALRM timeout: own handler, alarm(5), then alarm(0)), then works on."""
    from math_verify import parse

    assert parse("$\\frac{1}{3}$")  # math-verify's default parsing_timeout: signal.alarm in the main thread
    time.sleep(30)
    return [1.0] * len(completions)


def _swallows(completions, **kw):  # noqa: ANN001, ANN003, ANN202
    for _ in range(30):  # 30 s; each sleep past the deadline is cut by its next refire (every REFIRE_S)
        try:
            time.sleep(1.0)
        except BaseException:  # noqa: BLE001, S110 (a reward that catches everything)
            pass
    return [1.0] * len(completions)


@pytest.mark.parametrize("fn", [_alarm_user, _swallows], ids=["math_verify_alarm", "swallows_timeout"])
def test_a_reward_cannot_cancel_its_deadline(fn) -> None:  # noqa: ANN001
    pytest.importorskip("math_verify").parse("$1$")  # imported and warm: its own call is fast, our deadline not
    comp = RewardComponent("r", fn, timeout_s=0.5)
    t0 = time.monotonic()
    totals, per, metrics = CombinedReward([comp])(["a", "b"])
    took = time.monotonic() - t0
    assert per["r"] == [None, None] and metrics["reward/r/timeouts"] == 1.0
    assert took < 15, took  # not the 30 s the reward would take (room for a loaded machine)
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)  # math-verify restored its handler


# ---- keyword calls, factories, conversational ------------------------------------------------------------
def _ids_first(completion_ids, **kwargs):  # noqa: ANN001, ANN003, ANN202
    return [float(len(ids)) for ids in completion_ids]


def _no_kwargs(completions, solution):  # noqa: ANN001, ANN202
    return [float(c == s) for c, s in zip(completions, solution)]


def _state_reader(completions, trainer_state, **kwargs):  # noqa: ANN001, ANN003, ANN202
    return [trainer_state.global_step / trainer_state.max_steps] * len(completions)


def test_rewards_are_called_by_keyword_as_grpo_trainer_does() -> None:
    combo = CombinedReward([RewardComponent("ids", _ids_first), RewardComponent("exact", _no_kwargs),
                            RewardComponent("state", _state_reader)], max_steps=10)
    totals, per, _ = combo(["7", "8"], completion_ids=[[1, 2, 3], [4]], solution=["7", "7"], step=4, prompts=["p"] * 2)
    assert per == {"ids": [3.0, 1.0], "exact": [1.0, 0.0], "state": [0.4, 0.4]}
    assert totals == [4.4, 1.4]


def _make_penalty(max_len, scale=1.0):  # noqa: ANN001, ANN202
    def penalty(completion_ids, **kwargs):  # noqa: ANN001, ANN003, ANN202
        return [-scale * max(len(ids) - max_len, 0) for ids in completion_ids]

    return penalty


def _kw_factory(**params):  # noqa: ANN003, ANN202 (takes **kwargs: a factory only when the recipe says so)
    return lambda completions, **kw: [params["value"]] * len(completions)


def test_factories_are_called_with_the_recipe_keys(tmp_path: Path) -> None:
    fn = build_reward(f"{__name__}:_make_penalty", {"max_len": 2, "scale": 0.5})
    assert fn(completion_ids=[[1] * 5, [1]]) == [-1.5, 0.0]
    fn = build_reward(f"{__name__}:_kw_factory", {"value": 0.25}, factory=True)
    assert fn(completions=["a"]) == [0.25]
    with pytest.raises(TypeError, match="bad parameters"):
        build_reward(f"{__name__}:_make_penalty", {"max_length": 2})
    (tmp_path / "f.py").write_text("def get_x(n):\n    return n\n")
    with pytest.raises(TypeError, match="returned 3, not a reward function"):
        build_reward(f"{tmp_path / 'f.py'}:get_x", {"n": 3})


def test_conversational_is_decided_from_the_prompt_column() -> None:
    def seen(completions, prompts, **kw):  # noqa: ANN001, ANN003, ANN202
        ok = [isinstance(c, list) and c[0]["role"] == "assistant" for c in completions]
        return [float(o) + 10 * float(isinstance(p, list)) for o, p in zip(ok, prompts)]

    msgs = [[{"role": "user", "content": "1+1?"}]] * 2
    auto, native = RewardComponent("auto", seen), RewardComponent("native", seen, native=True)
    forced_off = RewardComponent("off", seen, conversational=False)
    combo = CombinedReward([auto, native, forced_off])
    _, per, _ = combo(["2", "3"], prompts=["rendered"] * 2, prompt=msgs)
    assert per == {"auto": [11.0, 11.0], "native": [0.0, 0.0], "off": [0.0, 0.0]}
    _, per, _ = combo(["2", "3"], prompts=["rendered"] * 2, prompt=["1+1?", "1+1?"])  # standard format
    assert per["auto"] == [0.0, 0.0]
    _, per, _ = CombinedReward([RewardComponent("on", seen, conversational=True)])(["2"], prompts=["p"])
    assert per["on"] == [1.0]


# ---- bad values, failures that stop the run, metrics ----------------------------------------------------
def _const(value):  # noqa: ANN001, ANN202
    return lambda completions, **kw: value


def test_non_finite_values_abstain_and_are_counted_even_at_weight_zero() -> None:
    nan = RewardComponent("nan", _const([float("nan"), 1.0, float("inf")]), weight=0.0)
    ok = RewardComponent("ok", _const([1.0, 2.0, 3.0]))
    totals, per, metrics = CombinedReward([nan, ok])(["a", "b", "c"])
    assert totals == [1.0, 2.0, 3.0] and all(math.isfinite(t) for t in totals)
    assert per["nan"] == [None, 1.0, None]
    assert metrics["reward/nan/nonfinite"] == 2.0 and metrics["reward/nan/abstained"] == 2.0


@pytest.mark.parametrize(
    ("out", "match"),
    [
        (["1.0", "2.0"], "returned '1.0' \\(str\\) at index 0"),
        (None, "returned None"),
        ([1.0], "returned 1 scores for 2 completions"),
        ("10", "returned '10' \\(str\\), not a list"),
        (3.0, "returned 3.0 \\(float\\), not a list"),
    ],
)
def test_bad_outputs_are_counted_errors_naming_the_reward_and_the_value(out: Any, match: str, caplog) -> None:  # noqa: ANN001
    comp = RewardComponent("shaky", _const(out))
    totals, per, metrics = CombinedReward([comp])(["a", "b"])
    assert per["shaky"] == [None, None] and metrics["reward/shaky/errors"] == 1.0 and totals == [0.0, 0.0]
    assert any("'shaky'" in r.message and re.search(match, r.message) for r in caplog.records)
    with pytest.raises(RewardConfigError, match=match):  # on the sample batch at build time: a config error
        CombinedReward([RewardComponent("shaky", _const(out))]).check(["a", "b"])


def test_numpy_and_tensor_outputs_are_accepted() -> None:
    import numpy as np
    import torch

    combo = CombinedReward([RewardComponent("np", _const(np.array([0.5, 1.0]))),
                            RewardComponent("pt", _const(torch.tensor([1.0, 0.0])))])
    assert combo(["a", "b"])[0] == [1.5, 1.0]


def test_a_reward_that_fails_every_call_stops_the_run_naming_it() -> None:
    comp = RewardComponent("broken", _raises, max_consecutive_failures=3)
    combo = CombinedReward([comp])
    combo(["a"])
    combo(["a"])
    with pytest.raises(RewardError, match=r"'broken' failed 3 calls in a row \(every call so far\).*boom") as info:
        combo(["a"])
    assert isinstance(info.value.__cause__, RuntimeError)


def test_occasional_failures_stay_counted_and_zero_never_stops() -> None:
    calls = {"n": 0}

    def flaky(completions, **kw):  # noqa: ANN001, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] % 3:
            raise RuntimeError("sometimes")
        return [1.0] * len(completions)

    comp = RewardComponent("flaky", flaky, max_consecutive_failures=3)
    for _ in range(9):  # fail, fail, ok, ...: never 3 in a row
        CombinedReward([comp])(["a"])
    assert comp.errors == 6 and comp.calls == 9
    never = RewardComponent("never", _raises, max_consecutive_failures=0)
    for _ in range(5):
        CombinedReward([never])(["a"])
    assert never.errors == 5


def test_failures_in_a_row_survive_a_resume() -> None:
    """Two failures, a checkpoint, a resumed run: its first failure is the third in a row and stops it. A
    state saved before the count was checkpointed loads (the count starts at 0)."""
    before = CombinedReward([RewardComponent("broken", _raises, max_consecutive_failures=3)])
    before(["a"])
    before(["a"])
    state = before.state_dict()
    assert state["broken"]["counters"]["failed_in_a_row"] == 2
    resumed = CombinedReward([RewardComponent("broken", _raises, max_consecutive_failures=3)])
    resumed.load_state_dict(state)
    with pytest.raises(RewardError, match=r"'broken' failed 3 calls in a row \(every call so far\)"):
        resumed(["a"])
    old = {"broken": {"counters": {k: v for k, v in state["broken"]["counters"].items() if k != "failed_in_a_row"},
                      "fn": None}}
    legacy = CombinedReward([RewardComponent("broken", _raises, max_consecutive_failures=3)])
    legacy.load_state_dict(old)
    assert legacy.components[0].calls == 2 and legacy.components[0].failed_in_a_row == 0
    legacy(["a"])
    legacy(["a"])  # two more failures: 2 in a row counted since the resume, not 3
    assert legacy.components[0].failed_in_a_row == 2


class _Counting:
    """A small reward class exposing metrics() (read and reset by CombinedReward after each call)."""

    def __init__(self) -> None:
        self.pending: dict[str, float] = {}

    def __call__(self, completions: list[str], log_metric: Any = None, **kw: Any) -> list[float]:
        self.pending = {"graded": float(len(completions)), "timeouts": 2.0, "memory/size": 7.0}
        log_metric("parsed_frac", 0.5)  # TRL's log_metric keyword
        return [1.0] * len(completions)

    def metrics(self) -> dict[str, float]:
        out, self.pending = self.pending, {}
        return out


def test_a_rewards_own_metrics_are_logged_under_its_name() -> None:
    fn = _Counting()
    _, _, m = CombinedReward([RewardComponent("cnt", fn)])(["a", "b", "c"])
    assert m["reward/cnt/graded"] == 3.0 and m["reward/cnt/parsed_frac"] == 0.5
    assert m["reward/cnt/timeouts"] == 2.0  # the reward's own per-item timeouts add to the component's (0)
    assert m["memory/size"] == 7.0  # an already namespaced key is kept
    assert fn.pending == {}


# ---- building from a recipe -----------------------------------------------------------------------------
def test_trl_and_open_r1_style_functions_plug_in_unchanged() -> None:
    from rl_small.trainer import build_rewards

    cfg = load_recipe(None, [
        "rewards=[{name: 'tests.helpers:open_r1_style_accuracy', conversational: true, columns: {answer: solution}},"
        " {name: 'tests.helpers:trl_reward_len', weight: 0.5}]"
    ])
    combined = build_rewards(cfg)
    comps = ["so \\boxed{7}", "I think \\boxed{8}"]
    totals, per, metrics = combined(comps, answer=["7", "7"], prompts=["p", "p"])
    assert per["tests.helpers:open_r1_style_accuracy"] == [1.0, 0.0]
    assert per["tests.helpers:trl_reward_len"] == [-(20 - 12.0), -(20 - 17.0)]
    assert totals == [1.0 - 4.0, 0.0 - 1.5]
    assert metrics["reward/tests.helpers:open_r1_style_accuracy/errors"] == 0.0


def test_missing_aliased_column_is_a_clear_error() -> None:
    comp = RewardComponent("acc", lambda completions, **kw: [1.0] * len(completions), columns={"gold": "solution"})
    _, per, m = CombinedReward([comp])(["x"], answer=["1"])
    assert per["acc"] == [None] and m["reward/acc/errors"] == 1.0
    with pytest.raises(RewardConfigError, match="column 'gold'"):
        CombinedReward([comp]).check(["x"], answer=["1"])


def test_listing_a_reward_twice_gives_distinct_names() -> None:
    from rl_small.builders import build_rewards

    cfg = load_recipe(None, ["rewards=[{name: math_accuracy}, {name: math_accuracy, extract: boxed, weight: 0.5}]"])
    combo = build_rewards(cfg)
    assert [c.name for c in combo.components] == ["math_accuracy", "math_accuracy#2"]
    _, per, _ = combo(["#### 4", "\\boxed{4}"], answer=["4", "4"])
    assert per == {"math_accuracy": [1.0, 1.0], "math_accuracy#2": [0.0, 1.0]}


ROWS = {"arith": (None, [{"id": "a-0", "question": "What is 2+2?", "answer": "4", "solution": "4"}])}


@pytest.mark.parametrize(
    ("reward", "match"),
    [
        ("tests.helpers:easy_domain_reward", None),  # runs: reads the 'domain' column the trainer adds
        ("math_accuracy", None),
        ("{name: 'tests.helpers:open_r1_style_accuracy', conversational: true}", None),
        ("'tests.test_rewards_base:_needs_tests_column'", r"_needs_tests_column.*TypeError.*'test_list'"),
        ("'tests.test_rewards_base:_returns_strings'", r"_returns_strings.*returned 'yes' \(str\)"),
        ("'tests.test_rewards_base:_raises'", r"_raises.*RuntimeError: boom"),
    ],
)
def test_build_checks_every_reward_on_a_sample_batch(reward: str, match: str | None) -> None:
    from rl_small.builders import build_rewards

    spec = reward if reward.startswith("{") else f"{{name: {reward}}}"
    cfg = load_recipe(None, [f"rewards=[{spec}]"])
    if match is None:
        build_rewards(cfg, ROWS)
        return
    with pytest.raises(RecipeError, match=match):
        build_rewards(cfg, ROWS)


def _needs_tests_column(completions, test_list):  # noqa: ANN001, ANN202
    return [1.0] * len(completions)


def _returns_strings(completions, **kw):  # noqa: ANN001, ANN003, ANN202
    return ["yes"] * len(completions)


class _Stateful:
    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, completions: list[str], **kw: Any) -> list[float]:
        self.seen += len(completions)
        return [float(self.seen)] * len(completions)

    def state_dict(self) -> dict[str, int]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seen = state["seen"]


def test_the_sample_check_leaves_counters_and_state_as_they_were() -> None:
    fn = _Stateful()
    comp = RewardComponent("st", fn)
    combo = CombinedReward([comp])
    combo.check(["a", "b"])
    assert fn.seen == 0 and comp.calls == 0
    assert combo(["a"])[0] == [1.0]


def test_the_memory_reward_is_sample_checked_unless_its_encoder_is_the_policy() -> None:
    """episodic_memory has ``bind_policy`` whatever its encoder; only with ``encoder: policy`` (not bound
    before the model loads) is the sample check skipped. With the hashing encoder a batch it cannot score (no
    question column, no prompts) is a config error at build time, and a good one leaves its memory empty."""
    from rewards.memory import EpisodicMemory

    hashing = EpisodicMemory(encoder="hashing")
    combo = CombinedReward([RewardComponent("episodic_memory", hashing, native=True)])
    with pytest.raises(RewardConfigError, match=r"'episodic_memory' fails on a sample batch: ValueError: "
                                                 r"episodic_memory needs the 'question' column or 'prompts'"):
        combo.check(["\\boxed{1}", "\\boxed{2}"], answer=["1", "1"])
    combo.check(["\\boxed{1}", "\\boxed{2}"], answer=["1", "1"], question=["q one", "q one"])
    assert len(hashing.success) == 0 and len(hashing.failure) == 0 and combo.components[0].calls == 0
    policy = CombinedReward([RewardComponent("episodic_memory", EpisodicMemory(encoder="policy"), native=True)])
    policy.check(["\\boxed{1}"], answer=["1"])  # not checked: it could not run before bind_policy


# ---- in the trainer -------------------------------------------------------------------------------------
def _fails_on_real_batches(completions, **kw):  # noqa: ANN001, ANN003, ANN202
    """Passes the 2-item sample check at build time, raises on every real (larger) batch."""
    if len(completions) > 2:
        raise ZeroDivisionError("bug in the reward")
    return [0.0] * len(completions)


def test_a_reward_that_raises_every_step_stops_the_run(tiny_overrides: list[str], tmp_path: Path) -> None:
    from rl_small.trainer import Trainer

    cfg = load_recipe(None, [*tiny_overrides, "train.steps=5", "rewards=[{name: 'tests.helpers:token_reward'}, "
                             "{name: 'tests.test_rewards_base:_fails_on_real_batches', max_consecutive_failures: 2}]"])
    tr = Trainer(cfg, tmp_path / "run")
    with pytest.raises(RewardError, match=r"'tests.test_rewards_base:_fails_on_real_batches' failed 2 calls in a "
                                          r"row \(every call so far\), last with ZeroDivisionError: bug in the reward"):
        tr.fit()
    assert tr.step_no == 1  # step 1 was trained (one failure is counted); the second failure stopped the run


def test_a_reward_failing_every_step_is_a_one_line_cli_error(tiny_overrides: list[str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Through ``rl-small train``: exit code 1 and one ``rl-small: error: ...`` line naming the reward, no
    traceback."""
    from rl_small.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", *tiny_overrides, "train.steps=5", "rewards=[{name: 'tests.helpers:token_reward'}, "
              "{name: 'tests.test_rewards_base:_fails_on_real_batches', max_consecutive_failures: 2}]"])
    out = capsys.readouterr()
    assert exc.value.code == 1, out.err[-2000:]
    assert "Traceback" not in out.err + out.out
    lines = [ln for ln in out.err.splitlines() if ln.startswith("rl-small:")]
    assert lines == ["rl-small: error: reward 'tests.test_rewards_base:_fails_on_real_batches' failed 2 calls in a "
                     "row (every call so far), last with ZeroDivisionError: bug in the reward "
                     "(rewards[].max_consecutive_failures=2)"], out.err[-2000:]


def _score_then_collective(world: Any) -> str:
    """One process of a DDP step: score its own rollouts (a reward fails only on process 1), then the next
    collective (a world.sum, as the trainer's guards do)."""
    import torch

    broken = _raises if world.rank == 1 else _const([1.0])
    combo = CombinedReward([RewardComponent("judge", broken, max_consecutive_failures=2)])
    try:
        for _ in range(3):
            combo.agreed(world, ["a"])
            world.sum(torch.zeros(1))
    except RewardError as err:
        return f"RewardError: {err}"
    except threading.BrokenBarrierError:
        return "hung in the next collective"
    return "finished"


def test_a_reward_failing_on_one_process_stops_every_process() -> None:
    """Each process scores only its own rollouts: when the reward reaches its failure limit on process 1
    only, both processes raise the same RewardError (naming the reward and the process) after the second
    batch, instead of process 1 alone raising and process 0 waiting in the next collective."""
    from tests.helpers import ThreadWorld

    out = ThreadWorld.run(ThreadWorld.group(2), _score_then_collective)
    want = ("RewardError: reward 'judge' failed 2 calls in a row (every call so far), last with RuntimeError: boom "
            "(rewards[].max_consecutive_failures=2) (on process 1 of 2)")
    assert out == [want, want]


def test_a_reward_that_cannot_run_is_a_config_error_before_the_model_loads(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rl_small.models
    from rl_small.trainer import Trainer

    def no_model(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(rl_small.models, "load_policy", no_model)
    cfg = load_recipe(None, [*tiny_overrides, "rewards=[{name: 'tests.helpers:open_r1_style_accuracy'}]"])
    with pytest.raises(RecipeError, match=r"sample of data 'arith'.*open_r1_style_accuracy.*TypeError.*'solution'"):
        Trainer(cfg, tmp_path / "run")


def test_deadlines_work_in_a_forked_child() -> None:
    import multiprocessing as mp

    with deadline(5.0):  # the parent's watchdog is running when the child forks
        ctx = mp.get_context("fork")
        with ctx.Pool(1) as pool:
            assert pool.apply(_child_deadline, ()) == "timeout"


def _child_deadline() -> str:
    try:
        with deadline(0.2):
            time.sleep(5)
    except RewardTimeout:
        return "timeout"
    return "slept"


def test_reward_parameters_are_checked_against_their_types_at_load() -> None:
    """``max_tokens: abc`` failed inside the first batch with "'<=' not supported between int and str"; the
    parameter is now checked against the reward's annotation when the reward is built, and named."""
    from rewards.base import build_reward

    with pytest.raises(TypeError, match=r"reward 'soft_overlong': parameter max_tokens='abc' does not fit its "
                                        r"type int"):
        build_reward("soft_overlong", {"max_tokens": "abc", "buffer": 10})
    with pytest.raises(TypeError, match=r"parameter buffer=1\.5 does not fit its type int"):
        build_reward("soft_overlong", {"max_tokens": 100, "buffer": 1.5})
    ok = build_reward("soft_overlong", {"max_tokens": 100, "buffer": 10})
    assert ok(["x"], completion_ids=[[1] * 95]) == pytest.approx([-0.5])  # 5 tokens into the 10-token buffer
