"""The protocol between the trainer and generation, and the backend factory.

    backend = make_backend(cfg.rollout, model, tokenizer)
    rollouts = backend.generate(prompts, SamplingSpec(n=8, max_new_tokens=128, temperature=1.0))
    backend.sync(adapter_dir_or_model, version=step)

``generate`` returns prompt-major groups: the n completions of ``prompts[i]`` are
``rollouts[i*n:(i+1)*n]`` and share ``group_id == i``. Every rollout carries its token ids, the sampler's
per-token logprobs when the backend has them, and the policy version that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rl_small.types import Prompt, Rollout

if TYPE_CHECKING:
    from rl_small.config import RolloutConfig


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters of one generate call."""

    n: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0


class RolloutBackend(Protocol):
    """What the trainer needs from generation."""

    version: int

    def generate(self, prompts: list[Prompt], sampling: SamplingSpec) -> list[Rollout]: ...

    def sync(self, weights: Path | Any, version: int) -> None: ...

    def close(self) -> None: ...


def make_backend(cfg: RolloutConfig, model: Any, tokenizer: Any) -> RolloutBackend:
    """Build the backend named by ``cfg.backend``."""
    if cfg.backend == "hf":
        from rl_small.rollout.hf import HFBackend

        return HFBackend(model, tokenizer, batch_size=cfg.generation_batch_size)
    if cfg.backend == "fake":
        from rl_small.rollout.fake import FakeBackend

        return FakeBackend(tokenizer, cfg.fake_completions)
    raise ValueError(f"unknown rollout backend {cfg.backend!r}")
