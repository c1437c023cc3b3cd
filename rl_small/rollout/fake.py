"""``fake`` backend: scripted completions (cycled in order), for tests of everything after generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rl_small.rollout.base import SamplingSpec
from rl_small.types import Prompt, Rollout


class FakeBackend:
    """Returns ``completions[k % len]`` for the k-th requested completion; tokenizes them for real.

    Under data parallelism (``world`` processes, this one ``rank``, each given the prompts
    ``global[rank::world]`` of a draw, as the trainer does) k counts over the global draw: every process returns
    what a single process given the whole draw would have returned for its prompts.
    """

    def __init__(self, tokenizer: Any, completions: list[str], rank: int = 0, world: int = 1) -> None:
        if not completions:
            raise ValueError("fake backend needs rollout.fake_completions (a non-empty list of strings)")
        if not 0 <= rank < world:
            raise ValueError(f"fake backend: rank {rank} is not in 0..{world - 1}")
        self.tokenizer = tokenizer
        self.completions = completions
        self.rank, self.world = rank, world
        self.version = 0
        self._k = 0  # completions of the global draws so far

    def generate(self, prompts: list[Prompt], sampling: SamplingSpec) -> list[Rollout]:
        out = []
        for gid, p in enumerate(prompts):
            prompt_ids = self.tokenizer(p.text, add_special_tokens=False)["input_ids"]
            start = self._k + (gid * self.world + self.rank) * sampling.n
            for j in range(sampling.n):
                text = self.completions[(start + j) % len(self.completions)]
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: sampling.max_new_tokens]
                truncated = len(ids) == sampling.max_new_tokens
                if not truncated and self.tokenizer.eos_token_id is not None:
                    ids = ids + [self.tokenizer.eos_token_id]
                out.append(Rollout(p, gid, prompt_ids, ids, text, None, truncated, self.version))
        self._k += len(prompts) * self.world * sampling.n
        return out

    def sync(self, weights: Path | Any, version: int) -> None:
        self.version = version

    def close(self) -> None:
        pass
