"""The ``hf`` backend's ``ignore_eos`` (fixed completion lengths for benchmarks) on a model that wants to stop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rl_small.rollout.base import SamplingSpec
from rl_small.rollout.hf import HFBackend
from rl_small.types import Prompt


def _eager_to_stop(model_dir: Path) -> tuple[Any, Any]:
    """The tiny model with EOS made the greedy choice at every position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 20.0  # p(EOS) ~ 1 - 3e-7 at every position, whatever the input
    model.lm_head = head
    return model, tok


def test_ignore_eos_generates_exactly_max_new_tokens(tiny_model_dir: Path) -> None:
    model, tok = _eager_to_stop(tiny_model_dir)
    backend = HFBackend(model, tok)
    prompts = [Prompt("a", "1 + 2 =", "3"), Prompt("b", "4 + 4 =", "8")]
    stops = backend.generate(prompts, SamplingSpec(n=3, max_new_tokens=7, temperature=1.0))
    assert [len(r.completion_ids) for r in stops] == [1] * 6  # EOS at once: the model wants to stop
    assert all(r.completion_ids == [tok.eos_token_id] and not r.truncated for r in stops)
    fixed = backend.generate(prompts, SamplingSpec(n=3, max_new_tokens=7, temperature=1.0, ignore_eos=True))
    assert [len(r.completion_ids) for r in fixed] == [7] * 6
    assert all(tok.eos_token_id not in r.completion_ids and r.truncated for r in fixed)
    assert [r.group_id for r in fixed] == [0, 0, 0, 1, 1, 1]
