"""``hf`` backend: transformers ``generate`` on the training model itself (CPU debugging, small runs).

Generation uses the live policy, so ``sync`` only records the version. It does not report sampler logprobs
(that would keep a vocabulary-sized tensor per step); the trainer computes the old-policy logprobs with one
forward pass instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rl_small.rollout.base import SamplingSpec
from rl_small.types import Prompt, Rollout


@contextmanager
def contiguous_head(model: Any) -> Iterator[None]:
    """While generating on a CPU in bf16/fp16: the LM head's input made contiguous. ``generate`` hands the head
    the strided last-position rows of the prefill (stride = prompt length x hidden), and CPU half-precision
    matmul then takes a slow path: an 8 x 100-token prefill of a PEFT-wrapped bf16 model (vocabulary 151,936)
    took 19.6 s against 0.9 s in fp32; 77 s -> 2.4 s for 16 x 100 tokens of the Qwen2.5-1.5B shape with the
    copy (BENCHMARKS §8). fp32 and GPUs keep their path, so the default run's numbers are unchanged."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if weight is None or weight.device.type != "cpu" or weight.dtype == torch.float32:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


class HFBackend:
    """Batched, left-padded sampling with ``model.generate``."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.version = 0
        eos = model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], sampling: SamplingSpec) -> list[Rollout]:
        flat = [(gid, p) for gid, p in enumerate(prompts) for _ in range(sampling.n)]
        out: list[Rollout] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with contiguous_head(self.model):
                for start in range(0, len(flat), self.batch_size):
                    out.extend(self._batch(flat[start : start + self.batch_size], sampling))
        finally:
            self.model.train(was_training)
        return out

    def _batch(self, items: list[tuple[int, Prompt]], sampling: SamplingSpec) -> list[Rollout]:
        tok = self.tokenizer
        enc = tok([p.text for _, p in items], return_tensors="pt", padding=True, add_special_tokens=False)
        # on the model's device: with CPU inputs beside a GPU model generate() still ran, at 0.26 s per token for
        # 24 sequences of a 1.5B model on an H200 (the tokens it builds on stay on the CPU)
        enc = enc.to(next(self.model.parameters()).device)
        greedy = sampling.temperature == 0
        gen = self.model.generate(
            **enc,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,
            pad_token_id=tok.pad_token_id,
            suppress_tokens=sorted(self.stop_ids) if sampling.ignore_eos else None,
        )
        width = enc["input_ids"].shape[1]
        rollouts = []
        for row, (gid, p) in enumerate(items):
            prompt_ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
            ids: list[int] = []
            stopped = False
            for t in gen[row, width:].tolist():
                ids.append(t)
                if t in self.stop_ids:
                    stopped = True
                    break
            text = tok.decode(ids, skip_special_tokens=True)
            rollouts.append(Rollout(p, gid, prompt_ids, ids, text, None, not stopped, self.version))
        return rollouts

    def sync(self, weights: Path | Any, version: int) -> None:
        self.version = version  # same model object: nothing to copy

    def close(self) -> None:
        pass
