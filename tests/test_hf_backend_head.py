"""The ``hf`` backend's LM-head input on CPU: contiguous in half precision (a slow strided path otherwise), left
as it is in fp32 (the default run's numbers), and no hook left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rl_small.rollout.base import SamplingSpec
from rl_small.rollout.hf import HFBackend
from rl_small.types import Prompt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_head_input_is_contiguous_in_half_precision_only(tiny_model_dir: Path, dtype: torch.dtype) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    head = model.get_output_embeddings()
    seen: list[tuple[bool, int]] = []  # (contiguous, rows) of every head call, after the pre-hooks
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append((args[0].is_contiguous(), args[0].shape[0])))
    prompts = [Prompt("a", "one two three four five six", ""), Prompt("b", "seven eight nine ten", "")]
    out = HFBackend(model, tok).generate(prompts, SamplingSpec(n=2, max_new_tokens=3, temperature=0.0))
    handle.remove()
    assert len(out) == 4 and seen and seen[0][1] == 4  # the prefill: 4 sequences
    if dtype == torch.float32:
        assert not seen[0][0]  # the strided prefill slice, untouched: the fp32 path as before
    else:
        assert all(c for c, _ in seen)
    assert not head._forward_pre_hooks  # removed after generate
