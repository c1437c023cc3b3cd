"""Task mixtures (data.mix) and RuleReasoner domain-aware dynamic sampling (sampling.domain_sampling)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from rl_small.config import RecipeError, load_recipe
from rl_small.data.mixture import DomainMixture, DynamicWeights
from rl_small.trainer import Trainer
from rl_small.types import Prompt

MIX = ("data.mix=[{task: arith, name: easy, difficulty: 1, weight: 1.0}, "
       "{task: arith, name: hard, difficulty: 3, weight: 1.0}]")


def _prompts(tag: str, n: int) -> list[Prompt]:
    return [Prompt(f"{tag}{i}", f"q{i}", "1") for i in range(n)]


def test_single_domain_walks_a_seeded_epoch_and_wraps() -> None:
    mix = DomainMixture({"a": _prompts("a", 5)}, {}, seed=3)
    first, _ = mix.draw(5)
    again, _ = mix.draw(5)
    assert sorted(p.id for p in first) == sorted(p.id for p in again) == [f"a{i}" for i in range(5)]
    assert [p.id for p in first] != [p.id for p in again]  # a new permutation each epoch
    assert mix.cursor["a"] == {"epoch": 2, "index": 0}


def test_static_weights_set_the_shares_and_resume_draws_the_same() -> None:
    mix = DomainMixture({"a": _prompts("a", 50), "b": _prompts("b", 50)}, {"a": 3.0, "b": 1.0}, seed=0)
    drawn, _ = mix.draw(400)
    share = Counter(p.id[0] for p in drawn)["a"] / 400
    assert abs(share - 0.75) < 0.06
    state = mix.state_dict()
    nxt = [p.id for p in mix.draw(10)[0]]
    other = DomainMixture({"a": _prompts("a", 50), "b": _prompts("b", 50)}, {"a": 3.0, "b": 1.0}, seed=0)
    other.load_state_dict(state)
    assert [p.id for p in other.draw(10)[0]] == nxt


def test_rulereasoner_weights_move_to_the_weaker_domain() -> None:
    mix = DomainMixture({"easy": _prompts("e", 9), "hard": _prompts("h", 9)}, {}, seed=0,
                        dynamic=DynamicWeights(target=1.0, tau=0.8, alpha=0.5))
    m = mix.observe(["easy", "easy", "hard", "hard"], [1.0, 1.0, 0.0, 0.0])
    # v = max(0, 1 - rbar) = [0, 1]; w = softmax([0, 1/0.8]) = [1/(1+e^1.25), e^1.25/(1+e^1.25)]
    assert m["sampling/domain_weight/hard"] == pytest.approx(math.exp(1.25) / (1 + math.exp(1.25)))
    m = mix.observe(["hard"], [1.0])  # easy keeps its estimate 1.0; hard: 0.5 * 0 + 0.5 * 1 = 0.5
    assert m["sampling/domain_reward/hard"] == 0.5 and m["sampling/domain_reward/easy"] == 1.0
    assert m["sampling/domain_weight/hard"] == pytest.approx(math.exp(0.625) / (1 + math.exp(0.625)))


def test_trainer_mixes_tasks_tags_domains_and_reweights(tiny_overrides: list[str], tmp_path: Path) -> None:
    overrides = tiny_overrides + [MIX, "sampling.domain_sampling=true", "rollout.prompts_per_step=4",
                                  "rewards=[{name: 'tests.helpers:easy_domain_reward'}]"]
    tr = Trainer(load_recipe(None, overrides), tmp_path / "run")
    assert set(tr.stream.mixture.names) == {"easy", "hard"} and tr.data_stats.kept == 2 * tr.cfg.data.num_train
    assert {p.columns["domain"] for p in tr.train_prompts} == {"easy", "hard"}
    first = [p.columns["domain"] for p in _probe(overrides, tmp_path).stream.next_prompts()]
    assert "easy" in first  # this seed's first batch mixes both (or only easy): the weights below follow
    m = tr.step()
    assert m["sampling/domain_reward/easy"] == 1.0 and m["sampling/domain_reward/hard"] == 0.0
    assert m["sampling/domain_weight/hard"] == pytest.approx(math.exp(1.25) / (1 + math.exp(1.25)))
    tr.save()
    resumed = Trainer(load_recipe(None, overrides), tmp_path / "run", resume=True)
    assert resumed.stream.mixture.state_dict() == tr.stream.mixture.state_dict()


def _probe(overrides: list[str], tmp_path: Path) -> Trainer:
    return Trainer(load_recipe(None, overrides), tmp_path / "probe")


def test_domain_sampling_without_a_mix_is_a_recipe_error(tiny_overrides: list[str], tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="needs data.mix with at least two tasks"):
        Trainer(load_recipe(None, tiny_overrides + ["sampling.domain_sampling=true"]), tmp_path / "run")


def test_repeated_domain_names_are_refused() -> None:
    with pytest.raises(RecipeError, match="repeated: \\['arith'\\]"):
        load_recipe(None, ["data.mix=[{task: arith}, {task: arith, difficulty: 2}]"])
