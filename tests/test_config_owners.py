"""Typed ``algo`` variants, the ``sampling`` section and backend-owned rollout options: an option of another
variant, filter or backend is an error naming the option and its owner; keys of earlier versions
(``algo.dynamic_sampling``, ``train.tensorboard``) keep working with a deprecation warning naming the new key;
the resolved config.yaml reloads."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from rl_small.config import RecipeError, dump_config, load_recipe
from rl_small.config_algo import DrGrpoConfig, GrpoConfig, PpoConfig, ReinforcePPConfig, RlooConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def warnings_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The rl_small logger's records (it does not propagate once rich logging is set up)."""
    lg = logging.getLogger("rl_small")
    lg.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        lg.removeHandler(caplog.handler)


@pytest.mark.parametrize(("overrides", "message"), [
    (["algo.gamma=0.5"], "algo.gamma is an option of ppo, not of grpo"),
    (["algo.name=rloo", "algo.scale_rewards=false"], "algo.scale_rewards is an option of grpo, not of rloo"),
    (["algo.group_baseline=true"], "algo.group_baseline is an option of reinforce_pp, not of grpo"),
    (["algo.name=dr_grpo", "algo.critic_lr=1e-4"], "algo.critic_lr is an option of ppo, not of dr_grpo"),
    (["algo.name=ppo", "algo.scale_rewards=false"], "algo.scale_rewards is an option of grpo, not of ppo"),
])
def test_an_option_of_another_variant_names_its_owner(overrides: list[str], message: str) -> None:
    """``algo.gamma=0.5`` under grpo was silently ignored (issue 16); now it names the variant it belongs to."""
    with pytest.raises(RecipeError) as err:
        load_recipe(None, overrides)
    assert f"  algo: {message}" in str(err.value).splitlines()


def test_an_option_of_another_variant_in_a_recipe_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algo:\n  name: reinforce_pp\n  lam: 0.9\n")
    with pytest.raises(RecipeError, match="algo.lam is an option of ppo, not of reinforce_pp"):
        load_recipe(recipe)


def test_each_variant_carries_its_papers_defaults() -> None:
    cls = {n: type(load_recipe(None, [f"algo.name={n}"]).algo) for n in ("grpo", "dr_grpo", "rloo", "reinforce_pp",
                                                                          "ppo")}
    assert cls == {"grpo": GrpoConfig, "dr_grpo": DrGrpoConfig, "rloo": RlooConfig, "reinforce_pp": ReinforcePPConfig,
                   "ppo": PpoConfig}
    assert type(load_recipe(None, []).algo) is GrpoConfig and load_recipe(None, []).algo.scale_rewards is True
    dr = load_recipe(None, ["algo.name=dr_grpo"]).algo
    assert dr.loss_agg == "seq_mean_token_sum_norm" and not hasattr(dr, "scale_rewards")
    ppo = load_recipe(None, ["algo.name=ppo"]).algo
    assert (ppo.gamma, ppo.lam, ppo.whiten_advantages, ppo.value_clip, ppo.critic_lr) == (1.0, 0.95, True, 0.2, None)
    assert load_recipe(None, ["algo.name=reinforce_pp"]).algo.group_baseline is False
    assert load_recipe(None, ["algo.name=ppo", "algo.gamma=0.5"]).algo.gamma == 0.5


def test_another_variants_default_value_changes_nothing_and_is_dropped() -> None:
    """Resolved config.yaml files of earlier versions list every option at its default: they still load."""
    a = load_recipe(None, ["algo.gamma=1.0", "algo.scale_rewards=true", "algo.name=rloo"]).algo
    assert type(a) is RlooConfig and not hasattr(a, "gamma")


@pytest.mark.parametrize(("overrides", "message"), [
    (["algo.cispo_cap=2.0"], "algo.cispo_cap is an option of policy_loss cispo, not of 'clipped'"),
    (["algo.policy_loss=gspo", "algo.dual_clip=3.0"], "algo.dual_clip is an option of policy_loss clipped, not of 'gspo'"),
    (["algo.name=ppo", "algo.gspo_clip=[0.1, 0.1]"], "algo.gspo_clip is an option of policy_loss gspo, not of 'clipped'"),
])
def test_a_policy_loss_option_of_an_unused_loss_names_the_loss(overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, overrides)
    assert load_recipe(None, ["algo.policy_loss=cispo", "algo.cispo_cap=2.0"]).algo.cispo_cap == 2.0


@pytest.mark.parametrize(("overrides", "message"), [
    (["sampling.max_sampling_rounds=5"], "sampling.max_sampling_rounds is an option of dynamic_sampling, which is off"),
    (["sampling.domain_tau=0.5"], "sampling.domain_tau is an option of domain_sampling, which is off"),
    (["sampling.pass_threshold=0.9"], ("sampling.pass_threshold is an option of difficulty_filter / dynamic_sampling, "
                                      "which is off")),
    (["algo.domain_ewma=0.1"], "sampling.domain_ewma is an option of domain_sampling, which is off"),  # moved first
])
def test_an_option_of_a_sampling_filter_that_is_off_names_the_filter(overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, overrides)
    cfg = load_recipe(None, ["sampling.difficulty_filter=true", "sampling.pass_threshold=0.9"])
    assert cfg.sampling.pass_threshold == 0.9


@pytest.mark.parametrize(("overrides", "message"), [
    (["rollout.backend=hf", "rollout.seed=3"], ("rollout.seed is an option of the vllm_server / vllm_engine backend, "
                                               "not of hf")),
    (["rollout.fake_completions=['1']"], "rollout.fake_completions is an option of the fake backend, not of auto"),
    (["rollout.backend=vllm_engine", "rollout.spawn=true"], ("rollout.spawn is an option of the vllm_server backend, "
                                                            "not of vllm_engine")),
    (["rollout.backend=fake", "rollout.generation_batch_size=8"], ("rollout.generation_batch_size is an option of the "
                                                                  "hf backend, not of fake")),
    (["rollout.backend=hf", "rollout.async_generation=true"], ("rollout.async_generation is an option of the "
                                                              "vllm_server backend, not of hf")),
    (["rollout.backend=hf", "rollout.sync=merged"], ("rollout.sync is an option of the vllm_server / vllm_engine "
                                                    "backend, not of hf")),
])
def test_a_rollout_option_of_another_backend_names_the_backend(overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, overrides)


def test_rollout_options_of_the_chosen_backend_load() -> None:
    auto = load_recipe(None, ["rollout.generation_batch_size=8", "rollout.spawn=true", "rollout.seed=3"]).rollout
    assert (auto.generation_batch_size, auto.spawn, auto.seed) == (8, True, 3)  # auto may become hf or vllm_server
    assert load_recipe(None, ["rollout.backend=vllm_engine", "rollout.seed=3"]).rollout.seed == 3
    assert load_recipe(None, ["rollout.backend=fake", "rollout.fake_completions=['1']"]).rollout.fake_completions == ["1"]
    assert load_recipe(None, ["rollout.backend=hf", "rollout.seed=0"]).rollout.seed == 0  # the default: no effect


def test_merged_sync_without_lora_is_refused_before_the_model_loads() -> None:
    from rl_small.builders import check_run

    class Acc:
        distributed_type = "NO"

    check_run(load_recipe(None, ["rollout.backend=vllm_engine", "rollout.sync=merged"]), Acc())  # LoRA: fine
    with pytest.raises(RecipeError, match="rollout.sync=merged merges a LoRA adapter .* needs model.lora"):
        check_run(load_recipe(None, ["rollout.backend=vllm_engine", "rollout.sync=merged", "model.lora=null"]), Acc())


def test_algo_sampling_keys_move_to_sampling_with_a_warning(warnings_log: pytest.LogCaptureFixture,
                                                            tmp_path: Path) -> None:
    """Users have recipes with ``algo.dynamic_sampling``: they keep working; the warning names the new key."""
    cfg = load_recipe(None, ["algo.dynamic_sampling=true", "algo.max_sampling_rounds=5"])
    assert cfg.sampling.dynamic_sampling and cfg.sampling.max_sampling_rounds == 5
    assert "algo.dynamic_sampling, algo.max_sampling_rounds moved to the sampling section " \
           "(sampling.dynamic_sampling, sampling.max_sampling_rounds)" in warnings_log.text
    recipe = tmp_path / "old.yaml"
    recipe.write_text("algo: {name: grpo, overlong_filter: true}\n")
    assert load_recipe(recipe).sampling.overlong_filter
    with pytest.raises(RecipeError, match="algo.overlong_filter and sampling.overlong_filter are both set"):
        load_recipe(recipe, ["sampling.overlong_filter=false"])


def test_train_tensorboard_is_a_deprecated_alias_of_trackers(warnings_log: pytest.LogCaptureFixture) -> None:
    assert load_recipe(None, ["train.tensorboard=false"]).train.trackers == []
    assert "train.tensorboard is deprecated: use train.trackers ([])" in warnings_log.text
    assert load_recipe(None, ["train.tensorboard=true"]).train.trackers is None  # = the default sinks
    with pytest.raises(RecipeError, match="train.tensorboard is replaced by train.trackers"):
        load_recipe(None, ["train.tensorboard=true", "train.trackers=[]"])


def test_a_tracker_that_is_not_installed_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(RecipeError, match="tracker 'mlflow' is not installed: pip install mlflow"):
        load_recipe(None, ["train.trackers=[mlflow]"])
    with pytest.raises(RecipeError, match="train.trackers.0"):
        load_recipe(None, ["train.trackers=[tensorbored]"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert load_recipe(None, ["train.trackers=[wandb, mlflow]"]).train.trackers == ["wandb", "mlflow"]


@pytest.mark.parametrize("recipe", [None, "smollm2-135m/ppo/arith.yaml", "smollm2-135m/dapo/arith.yaml",
                                    "smollm2-135m/dr_grpo/arith.yaml", "smollm2-135m/grpo/arith_mix.yaml"])
def test_the_resolved_config_reloads(recipe: str | None, tmp_path: Path) -> None:
    cfg = load_recipe(ROOT / "recipes" / recipe if recipe else None)
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_recipe(tmp_path / "config.yaml").model_dump() == cfg.model_dump()


def test_a_resolved_config_of_the_flat_algo_section_reloads(tmp_path: Path) -> None:
    """A run directory written before the typed variants (every algo option listed, sampling inside algo,
    train.tensorboard) resumes with the same settings."""
    tree = yaml.safe_load(yaml.safe_dump(load_recipe(None).model_dump(mode="json")))
    sampling = tree.pop("sampling") | {"dynamic_sampling": True}
    tree["algo"] |= sampling | {"name": "dr_grpo", "scale_rewards": True, "group_baseline": False, "gamma": 1.0,
                                "lam": 0.95, "whiten_advantages": True, "value_clip": 0.2, "critic_lr": None}
    tree["train"] = {k: v for k, v in tree["train"].items() if k != "trackers"} | {"tensorboard": True}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_recipe(tmp_path / "config.yaml")
    assert type(cfg.algo) is DrGrpoConfig and cfg.algo.loss_agg == "token_mean"  # as the old file said
    assert cfg.sampling.dynamic_sampling and cfg.train.trackers is None


def test_backend_overrides_switch_a_vllm_recipe_to_hf() -> None:
    """A rehearsal runs every recipe on hf: the recipe's vLLM options go back to their defaults."""
    from rl_small.rehearsal import backend_overrides

    recipe = ROOT / "recipes/qwen2.5-1.5b/grpo/math.yaml"
    cfg = load_recipe(recipe)
    over = backend_overrides(cfg, "hf")
    assert over[0] == "rollout.backend=hf" and 'rollout.vllm_dtype="float32"' in over
    with pytest.raises(RecipeError, match="rollout.enforce_eager is an option of the vllm_server / vllm_engine backend, not of hf"):
        load_recipe(recipe, ["rollout.backend=hf"])
    hf = load_recipe(recipe, over).rollout
    assert hf.backend == "hf" and hf.vllm_dtype == "float32" and hf.enforce_eager is True
    assert backend_overrides(cfg, "auto") == ["rollout.backend=auto"]
