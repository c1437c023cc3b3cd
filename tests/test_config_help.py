"""Config UX: an unknown key names the closest known one; ``rl-small config [section]`` lists every field
with its type, default and description, read from the pydantic models."""

from __future__ import annotations

import pytest

from rl_small.config import RecipeError, RunConfig, load_recipe
from rl_small.config_algo import VARIANTS, AlgoBase
from rl_small.config_help import all_keys, closest_key, describe


@pytest.mark.parametrize(("override", "key", "suggestion"), [
    ("algo.kl_coeff=0.1", "algo.kl_coeff", "algo.kl_coef"),  # a typo in the right section
    ("rollout.kl_coef=0.1", "rollout.kl_coef", "algo.kl_coef"),  # the right name in the wrong section
    ("rolout.group_size=4", "rolout", "rollout"),  # a typo in a section name (pydantic names the section)
    ("model.lora.alfa=8", "model.lora.alfa", "model.lora.alpha"),  # nested section
])
def test_unknown_key_suggests_the_closest(override: str, key: str, suggestion: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(None, [override])
    assert f"unknown key '{key}'; did you mean {suggestion}? (rl-small config)" in str(err.value)


def test_no_suggestion_when_nothing_is_close() -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["train.zzzzzzzz=1"])
    assert "unknown key 'train.zzzzzzzz' (rl-small config)" in str(err.value)
    assert closest_key(("train", "zzzzzzzz")) is None
    assert closest_key(("data", "mix", 0, "weigth")) == "data.mix.weight"  # list indices are skipped


def test_describe_lists_every_field_with_type_default_and_description() -> None:
    text = describe("algo")
    lines = text.splitlines()
    own = {(n, f) for n, v in VARIANTS.items() for f in v.model_fields if f != "name"
           and (f not in AlgoBase.model_fields or v.model_fields[f].default != AlgoBase.model_fields[f].default)}
    assert len(lines) == 1 + len(AlgoBase.model_fields) + len(own)  # name, the shared fields, each variant's own
    assert "algo.gamma: float = 1.0  [name: ppo] ppo: GAE discount." in lines
    assert 'algo.loss_agg: token_mean|seq_mean_token_mean|seq_mean_token_sum_norm = "seq_mean_token_sum_norm"  ' \
           "[name: dr_grpo] Loss aggregation; Dr. GRPO's: sum over tokens / (G x max length)." in lines
    assert "algo.scale_rewards: bool = true  [name: grpo]" in text
    assert "algo.kl_coef: float = 0.0  beta of the KL to the reference (base model, adapter off)." in lines
    assert 'algo.name: grpo|dr_grpo|rloo|reinforce_pp|ppo = "grpo"  Advantage estimator;' in text
    assert "algo.clip: tuple[float, float] = [0.2, 0.2]" in text
    whole = describe(None)
    leaves = [k for k in all_keys() if whole.count(f"\n{k}:") + whole.startswith(f"{k}:")]
    assert "model.lora.r" in leaves and "train.steps" in leaves
    for section in ("model", "data", "rollout", "algo", "sampling", "optim", "train"):
        models = VARIANTS.values() if section == "algo" else [type(getattr(RunConfig(), section))]
        assert all(f"{section}.{f}:" in whole for m in models for f in m.model_fields), section
    assert "rewards[].<any other key>: a parameter of the reward" in describe("rewards")
    assert describe("model.lora").splitlines()[0] == "model.lora.r: int = 16  LoRA rank."


def test_config_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from rl_small.cli import main

    with pytest.raises(SystemExit) as err:
        main(["config", "optim"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("optim.") and "optim.lr: float = " in out
    with pytest.raises(SystemExit) as err:
        main(["config", "algos"])
    assert err.value.code == 1
    assert "unknown config section 'algos'; did you mean 'algo'?" in capsys.readouterr().err
