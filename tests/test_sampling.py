"""Batch-level sampling (rl_small.sampling) with scripted groups: no model needed."""

from __future__ import annotations

import pytest
import torch

from rl_small.sampling import (
    PassRateTracker,
    domain_weights,
    dynamic_sample,
    ewma,
    group_signal,
    merge_round_metrics,
    overlong_keep,
)
from rl_small.types import Group, Prompt, Rollout

TIED, MIXED = [1.0, 1.0, 1.0], [1.0, 0.0, 1.0]


def _group(pid: str, gid: int, rewards: list[float], components: dict | None = None) -> Group:
    """A scored group of ``len(rewards)`` one-token rollouts of prompt ``pid`` (``gid``: its place in the draw)."""
    p = Prompt(pid, "", "")
    return Group(p, [Rollout(p, gid, [1], [2], "", None, False, 0) for _ in rewards], list(rewards), components or {})


def _scripted(rounds: list[list[list[float]]]) -> tuple[list[int], object]:
    """A ``draw`` that returns the next round's groups (one list of rewards per group) and records ``n``."""
    calls: list[int] = []

    def draw(n: int) -> list[Group]:
        calls.append(n)
        return [_group(f"r{len(calls)}g{gid}", gid, rewards) for gid, rewards in enumerate(rounds[len(calls) - 1][:n])]

    return calls, draw


def test_dynamic_sampling_drops_tied_groups_and_refills() -> None:
    calls, draw = _scripted([[TIED, MIXED, TIED, TIED], [MIXED, MIXED, TIED, MIXED]])
    groups, m = dynamic_sample(draw, target=4, max_extra_rounds=3)
    # round 1 keeps 1 of 4; round 2 asks for min(4, ceil(3 missing * 4 seen / 1 kept)) = 4 and keeps 3 more
    assert calls == [4, 4]
    assert m == {"sampling/rounds": 2.0, "sampling/dropped_groups": 4.0, "sampling/kept_groups": 4.0,
                 "sampling/batch_fill": 1.0}
    ids = [g.prompt.id for g in groups]
    assert ids == ["r1g1", "r2g0", "r2g1", "r2g3"]
    # the batch's group structure is the list: the rollouts keep the ids their draw gave them (not renumbered)
    assert [[r.group_id for r in g.rollouts] for g in groups] == [[1] * 3, [0] * 3, [1] * 3, [3] * 3]


def test_dynamic_sampling_asks_for_the_missing_groups_at_the_observed_keep_rate() -> None:
    calls, draw = _scripted([[MIXED, MIXED, MIXED, TIED], [MIXED, MIXED]])
    groups, m = dynamic_sample(draw, target=4, max_extra_rounds=3)
    assert calls == [4, 2]  # 1 missing / keep rate 3/4 -> ceil(1.33) = 2 prompts
    assert len(groups) == 4 and m["sampling/dropped_groups"] == 1.0  # the extra kept group is discarded


def test_dynamic_sampling_caps_rounds_and_never_returns_nothing() -> None:
    calls, draw = _scripted([[TIED, TIED]] * 5)
    scored, m = dynamic_sample(draw, target=2, max_extra_rounds=2)
    assert calls == [2, 2, 2]  # 1 round + 2 extra
    assert m["sampling/rounds"] == 3 and m["sampling/dropped_groups"] == 6 and m["sampling/batch_fill"] == 0.0
    assert [len(g.rollouts) for g in scored] == [3, 3]  # the first round, tied (zero advantage) rather than an empty batch
    with pytest.raises(ValueError, match="max_extra_rounds >= 0, got 2, -1"):
        dynamic_sample(draw, target=2, max_extra_rounds=-1)


def test_merge_round_metrics_weights_means_and_adds_counters() -> None:
    merged = merge_round_metrics([
        (8, {"reward/total": 1.0, "reward/x/errors": 1.0, "timing/reward/x": 0.5, "reward/x/nonfinite": 1.0}),
        (24, {"reward/total": 0.0, "reward/x/errors": 2.0, "timing/reward/x": 0.25, "reward/x/nonfinite": 1.0}),
    ])
    # every counter of rewards.base adds up (nonfinite was averaged, 1.0, before it was read from metric_names)
    assert merged == {"reward/total": 0.25, "reward/x/errors": 3.0, "timing/reward/x": 0.75, "reward/x/nonfinite": 2.0}


def test_overlong_keep() -> None:
    assert torch.equal(overlong_keep([True, False, True]), torch.tensor([0.0, 1.0, 0.0]))


def test_pass_rate_tracker_skips_solved_and_unsolved_prompts_and_round_trips() -> None:
    t = PassRateTracker()
    t.update(["a"] * 4 + ["b"] * 4 + ["c"] * 4, [True] * 4 + [False] * 4 + [True, False, None, None])
    assert t.rate("a") == 1.0 and t.rate("b") == 0.0 and t.rate("c") == 0.5 and t.rate("new") is None
    assert t.skip("a") and t.skip("b") and not t.skip("c") and not t.skip("new")
    t.update(["c"], [True])
    assert t.rate("c") == pytest.approx(2 / 3)
    u = PassRateTracker()
    u.load_state_dict(t.state_dict())
    assert u.stats == t.stats == {"a": [4, 4], "b": [0, 4], "c": [2, 3]}


def test_domain_weights_by_hand() -> None:
    w = domain_weights(torch.tensor([0.2, 0.8, 1.0]), target=1.0, tau=0.8)
    # v = [0.8, 0.2, 0] -> v/tau = [1, 0.25, 0] -> softmax = e^[1, .25, 0] / 5.002307
    torch.testing.assert_close(w, torch.tensor([0.543406, 0.256687, 0.199908]), atol=1e-6, rtol=0)
    # above the target is as good as at it; a larger tau flattens
    torch.testing.assert_close(domain_weights(torch.tensor([1.0, 1.5])), torch.tensor([0.5, 0.5]))
    flat = domain_weights(torch.tensor([0.2, 0.8, 1.0]), tau=10.0)
    assert flat.max() - flat.min() < w.max() - w.min()
    with pytest.raises(ValueError, match="tau must be > 0, got 0"):
        domain_weights(torch.tensor([0.5]), tau=0)


def test_ewma() -> None:
    assert torch.equal(ewma(None, torch.tensor([0.4, 0.0])), torch.tensor([0.4, 0.0]))
    torch.testing.assert_close(ewma(torch.tensor([0.2, 0.6]), torch.tensor([0.4, 0.0]), 0.5), torch.tensor([0.3, 0.3]))
    with pytest.raises(ValueError, match="alpha must be in"):
        ewma(None, torch.tensor([0.1]), alpha=1.0)


def _global_stream(informative: object) -> object:
    """``draw`` factory over one global prompt stream (group k has rewards MIXED if ``informative(k)`` else
    TIED): a process of a world of ``size`` takes its slice ``[rank::size]`` of each draw of ``n * size``, as
    RolloutStream.next_prompts does; it records the global indices it was given."""

    def make(rank: int, size: int) -> tuple[list[int], object]:
        cursor, given = [0], []

        def draw(n: int) -> list[Group]:
            ks = list(range(cursor[0], cursor[0] + n * size))[rank::size]
            cursor[0] += n * size
            given.extend(ks)
            return [_group(f"g{k}", gid, MIXED if informative(k) else TIED) for gid, k in enumerate(ks)]

        return given, draw

    return make


def test_dynamic_sampling_across_processes_keeps_the_single_process_batch() -> None:
    from tests.helpers import ThreadWorld

    make = _global_stream(lambda k: k % 3 != 0)  # groups 0, 3, 6, ... are tied
    _, draw = make(0, 1)
    single, m1 = dynamic_sample(draw, target=4, max_extra_rounds=3)

    def one(world: ThreadWorld) -> tuple[list[Group], dict[str, float], list[int]]:
        given, draw = make(world.rank, world.size)
        scored, m = dynamic_sample(draw, target=2, max_extra_rounds=3, world=world)
        return scored, m, given

    (s0, m0, given0), (s1, m1b, given1) = ThreadWorld.run(ThreadWorld.group(2), one)
    # round 1: global groups 0..3 keep 1, 2; round 2 asks for min(4, 2 missing * 4 seen / 2 kept) = 4: groups
    # 4..7 keep 4, 5, 7; the batch is the first four kept in draw order, as one process keeps them
    assert given0 == [0, 2, 4, 6] and given1 == [1, 3, 5, 7]
    ids = [g.prompt.id for g in single]
    assert ids == ["g1", "g2", "g4", "g5"]
    assert [g.prompt.id for g in s0] == ids[:2] and [g.prompt.id for g in s1] == ids[2:]
    assert [len(g.rollouts) for g in s1] == [3, 3] and all(g.weight == 1.0 for g in s0 + s1)
    assert m0 == m1b == {**m1, "sampling/filler_groups": 0.0}  # global counts, the same on every process
    assert m1 == {"sampling/rounds": 2.0, "sampling/dropped_groups": 3.0, "sampling/kept_groups": 4.0,
                  "sampling/batch_fill": 1.0}


def test_dynamic_sampling_across_processes_fills_a_short_batch_with_weightless_groups() -> None:
    from tests.helpers import ThreadWorld

    make = _global_stream(lambda k: k == 1)  # only global group 1 teaches anything

    def one(world: ThreadWorld) -> tuple[list[Group], dict[str, float]]:
        return dynamic_sample(make(world.rank, world.size)[1], target=2, max_extra_rounds=1, world=world)

    (s0, m0), (s1, m1) = ThreadWorld.run(ThreadWorld.group(2), one)
    assert [len(g.rollouts) for g in s0] == [len(g.rollouts) for g in s1] == [3, 3]  # DDP sees the same shapes
    assert [(g.prompt.id, g.weight) for g in s0] == [("g1", 1.0), ("g0", 0.0)]  # rank 1's group, dealt to 0
    assert [g.weight for g in s1] == [0.0, 0.0]
    first = s0[1].rollouts[0]  # a filler is a weightless copy of a first-round group: the original is untouched
    assert first.prompt.id == "g0" and first.group_id == 0
    assert m0 == m1 == {"sampling/rounds": 2.0, "sampling/dropped_groups": 7.0, "sampling/kept_groups": 1.0,
                        "sampling/batch_fill": 0.25, "sampling/filler_groups": 3.0}


def _dapo_groups() -> list[Group]:
    """A DAPO-style total: math_accuracy (1/0) + 0.1 * boxed_format + soft_overlong; group 0 is all wrong but
    its totals differ (format / length shaping), group 1 has one right answer."""
    def group(gid: int, rows: list[tuple[float | None, float, float]]) -> Group:
        comps = {"math_accuracy": [a for a, _, _ in rows], "boxed_format": [f for _, f, _ in rows],
                 "soft_overlong": [o for _, _, o in rows]}
        return _group(f"g{gid}", gid, [(a or 0.0) + 0.1 * f + o for a, f, o in rows], comps)

    return [group(0, [(0.0, 1.0, 0.0), (0.0, 0.0, -0.5), (None, 1.0, 0.0)]),
            group(1, [(1.0, 1.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.0)])]


@pytest.mark.parametrize(("on", "names", "kept"), [
    ("auto", ["math_accuracy", "boxed_format", "soft_overlong"], ["g1"]),  # DAPO: all-wrong group dropped
    ("pass", ["math_accuracy", "boxed_format", "soft_overlong"], ["g1"]),
    ("reward", ["math_accuracy", "boxed_format", "soft_overlong"], ["g0", "g1"]),  # totals differ: both kept
    ("auto", ["boxed_format", "soft_overlong"], ["g0", "g1"]),  # no pass reward: falls back to the total
])
def test_dynamic_sampling_filters_on_passes_not_the_shaped_total(on: str, names: list[str], kept: list[str]) -> None:
    from types import SimpleNamespace

    algo = SimpleNamespace(dynamic_sampling_on=on, pass_reward="math_accuracy", pass_threshold=0.5)
    groups = _dapo_groups()
    kept_groups, m = dynamic_sample(lambda n: groups, target=2, max_extra_rounds=0, signal=group_signal(algo, names))
    ids = sorted(g.prompt.id for g in kept_groups)
    assert ids == kept
    assert m["sampling/kept_groups"] == len(kept) and m["sampling/dropped_groups"] == 2 - len(kept)


def test_dynamic_sampling_on_pass_needs_the_pass_reward() -> None:
    from rl_small.builders import check_run
    from rl_small.config import RecipeError, RunConfig

    cfg = RunConfig.model_validate({"sampling": {"dynamic_sampling": True, "dynamic_sampling_on": "pass"},
                                    "rewards": [{"name": "boxed_format"}]})
    with pytest.raises(RecipeError, match="sampling.pass_reward 'math_accuracy'"):
        check_run(cfg, type("Acc", (), {"distributed_type": "NO"})())


def test_sync_check_error_below_warn_is_refused_before_the_model_loads() -> None:
    from rl_small.builders import check_run
    from rl_small.config import RecipeError, RunConfig

    cfg = RunConfig.model_validate({"rollout": {"sync_check_warn": 10.0, "sync_check_error": 5.0}})
    with pytest.raises(RecipeError, match="rollout.sync_check_error=5.0 is below rollout.sync_check_warn=10.0"):
        check_run(cfg, type("Acc", (), {"distributed_type": "NO"})())
    check_run(RunConfig.model_validate({"rollout": {"sync_check_error": None}}), type("Acc", (), {"distributed_type": "NO"})())
