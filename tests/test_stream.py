"""The rollout stream (rl_small.rollout.stream) and the groups it hands the trainer, without a trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rl_small.builders import build_rewards
from rl_small.config import RecipeError, load_recipe
from rl_small.data.domains import build_mixture, load_domains
from rl_small.distributed import World
from rl_small.rollout.base import RolloutError, SamplingSpec, as_groups
from rl_small.rollout.fake import FakeBackend
from rl_small.rollout.stream import RolloutStream
from rl_small.types import Prompt, Rollout

COMPLETIONS = ["1", "22", "333", "4444", "55555"]


class ThreadSafeFake(FakeBackend):
    """The fake backend, declared safe to call from the prefetch thread (as vllm_server is)."""

    thread_safe = True


def _stream(tiny_model_dir: Path, overrides: list[str], backend_cls: type = FakeBackend) -> RolloutStream:
    from transformers import AutoTokenizer

    cfg = load_recipe(None, [f"model.name={tiny_model_dir}", "data.num_train=16", "rollout.group_size=3",
                             "rollout.prompts_per_step=2", "rollout.max_new_tokens=8", "train.steps=4",
                             "rewards=[{name: 'tests.helpers:token_reward'}]", *overrides])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, _ = load_domains(cfg.data)
    return RolloutStream(cfg, build_mixture(cfg, rows, tok), backend_cls(tok, COMPLETIONS), build_rewards(cfg),
                         World())


def test_groups_are_scored_per_prompt(tiny_model_dir: Path) -> None:
    stream = _stream(tiny_model_dir, [])
    m: dict[str, float] = {}
    groups = stream.next_groups(0, m)
    assert [len(g.rollouts) for g in groups] == [3, 3] and all(g.weight == 1.0 for g in groups)
    assert [r.text for g in groups for r in g.rollouts] == ["1", "22", "333", "4444", "55555", "1"]
    for g in groups:
        assert all(r.prompt is g.prompt for r in g.rollouts)
        ids = [r.completion_ids for r in g.rollouts]
        expected = [(sum(x) % 97) / 97 - 1.0 / (1 + len(x)) for x in ids]  # tests.helpers.token_reward
        assert g.rewards == pytest.approx(expected) and g.components["tests.helpers:token_reward"] == g.rewards
    assert m["reward/total"] == pytest.approx(sum(x for g in groups for x in g.rewards) / 6)
    assert m["rollout/len_mean"] == pytest.approx(sum(len(r.completion_ids) for g in groups for r in g.rollouts) / 6)
    assert {"timing/prompts", "timing/rollout", "timing/reward"} <= set(m)


def test_prefetch_is_the_next_draw_and_a_checkpoint_keeps_the_cursor_before_it(tiny_model_dir: Path) -> None:
    over = ["rollout.async_generation=true", "rollout.backend=vllm_server"]
    stream = _stream(tiny_model_dir, over, ThreadSafeFake)
    before = stream.mixture.state_dict()
    stream.next_groups(0, {})
    ahead = [p.id for p in stream.prefetched]
    assert len(ahead) == 2 and stream.state_dict()["cursor"] != before
    saved = stream.state_dict()
    second = stream.next_groups(1, {})  # the prefetched draw, not a new one
    assert [g.prompt.id for g in second] == ahead
    resumed = _stream(tiny_model_dir, over, ThreadSafeFake)
    resumed.load_state_dict(saved)
    assert [p.id for p in resumed.next_prompts()] == ahead  # the prompts in flight at the save are redrawn
    for s in (stream, resumed):
        s.next_groups(3, {})  # the last step prefetches nothing
        assert s.prefetched == []


def test_async_generation_refuses_a_backend_that_is_not_thread_safe(tiny_model_dir: Path) -> None:
    with pytest.raises(RecipeError, match="async_generation needs the vllm_server backend .* not FakeBackend"):
        _stream(tiny_model_dir, ["rollout.async_generation=true", "rollout.backend=vllm_server"])


def _rollouts(prompts: list[Prompt], n: int) -> list[Rollout]:
    return [Rollout(p, i, [1], [2], "", None, False, 0) for i, p in enumerate(prompts) for _ in range(n)]


def test_as_groups_takes_prompt_major_output_by_position() -> None:
    prompts = [Prompt("a", "", ""), Prompt("b", "", "")]
    groups = as_groups(prompts, _rollouts(prompts, 2), 2)
    assert [(g.prompt.id, [r.prompt.id for r in g.rollouts]) for g in groups] == [("a", ["a", "a"]), ("b", ["b", "b"])]
    with pytest.raises(RolloutError, match="returned 3 rollouts for 2 prompts x n=2"):
        as_groups(prompts, _rollouts(prompts, 2)[:3], 2)
    swapped = _rollouts(prompts[::-1], 2)
    with pytest.raises(RolloutError, match="rollouts 0..1 should answer prompt 'a' .* one answers 'b'"):
        as_groups(prompts, swapped, 2)


def test_stream_numbers_groups_for_rewards_by_their_place_in_the_draw(tiny_model_dir: Path) -> None:
    stream = _stream(tiny_model_dir, [])
    seen: dict[str, Any] = {}

    def spy(completions: list[str], group_id: list[int], **kwargs: Any) -> list[float]:
        seen["group_id"] = group_id
        return [0.0] * len(completions)

    prompts = [Prompt("a", "x", ""), Prompt("b", "y", "")]
    groups = as_groups(prompts, stream.backend.generate(prompts, SamplingSpec(n=3)), 3)
    stream.rewards.components[0].fn = spy
    stream.score(groups, 0)
    assert seen["group_id"] == [0, 0, 0, 1, 1, 1]
