"""Reward contract: registry, plugins, abstention, and containment of rewards that raise or hang."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rewards import CombinedReward, RewardComponent, RewardTimeout, build_reward, deadline, register_reward


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


def test_dotted_module_plugin() -> None:
    fn = build_reward("rewards.format:boxed_format")
    assert fn(["\\boxed{1}", "none"]) == [1.0, 0.0]


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


def test_raising_and_hanging_rewards_abstain_are_counted_and_the_rest_still_scores() -> None:
    good = RewardComponent("good", lambda c, **k: [float(len(x)) for x in c], weight=2.0)
    bad = RewardComponent("bad", _raises)
    slow = RewardComponent("slow", _hangs, timeout_s=0.3)
    busy = RewardComponent("busy", _busy_hangs, timeout_s=0.3)
    combo = CombinedReward([good, bad, slow, busy])
    t0 = time.monotonic()
    totals, per, metrics = combo(["ab", "abcd"])
    assert time.monotonic() - t0 < 5
    assert totals == [4.0, 8.0]
    assert per["bad"] == [None, None] and per["slow"] == [None, None] and per["busy"] == [None, None]
    assert metrics["reward/bad/errors"] == 1.0 and metrics["reward/slow/timeouts"] == 1.0
    assert metrics["reward/busy/timeouts"] == 1.0
    assert metrics["reward/good"] == 3.0
    assert (bad.errors, slow.timeouts, busy.timeouts) == (1, 1, 1)
    totals, _, _ = combo(["a"])  # the run continues: the next batch is scored again
    assert totals == [2.0] and bad.errors == 2


def test_none_abstains_from_the_sum() -> None:
    comp = RewardComponent("half", _half, weight=1.0)
    totals, _, metrics = CombinedReward([comp])(["a", "b", "c"])
    assert totals == [1.0, 0.0, 1.0]
    assert metrics["reward/half/abstained"] == 1.0 and metrics["reward/half"] == 1.0


def test_wrong_number_of_scores_is_an_error() -> None:
    comp = RewardComponent("short", lambda c, **k: [1.0])
    with pytest.raises(ValueError, match="'short' returned 1 scores for 2"):
        comp(["a", "b"])


def test_nested_deadlines_inner_fires_outer_survives() -> None:
    with deadline(2.0):
        with pytest.raises(RewardTimeout):
            with deadline(0.1):
                time.sleep(1)
        time.sleep(0.05)  # the outer deadline is restored and has not fired
    with pytest.raises(RewardTimeout):
        with deadline(0.1):
            with deadline(5.0):  # the outer, shorter deadline still applies inside
                time.sleep(1)


def test_trl_and_open_r1_style_functions_plug_in_unchanged() -> None:
    from rl_small.config import load_recipe
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
    with pytest.raises(KeyError, match="column 'gold'"):
        comp(["x"], answer=["1"])
