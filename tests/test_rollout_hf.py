"""The ``hf`` backend's ``ignore_eos`` (fixed completion lengths for benchmarks) on a model that wants to stop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
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


def test_generate_gets_its_inputs_on_the_models_device(tiny_model_dir: Path) -> None:
    """The tokenizer builds the prompts on the CPU; a GPU model must get them on the GPU (with CPU inputs the
    H200 run generated at 0.26 s per token). A stand-in whose weights are on ``meta`` records the devices."""
    from transformers import AutoTokenizer

    seen: set[str] = set()

    class Elsewhere(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, device="meta"))
            self.generation_config = type("G", (), {"eos_token_id": None})()

        def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
            seen.update({input_ids.device.type, attention_mask.device.type})
            raise StopIteration  # meta tensors hold no tokens to decode: the inputs' devices are the point

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(StopIteration):
        HFBackend(Elsewhere(), tok).generate([Prompt("a", "2 + 2 =", "4")], SamplingSpec(n=2, max_new_tokens=2))
    assert seen == {"meta"}
