"""``fake`` backend: scripted completions (cycled in order), for tests of everything after generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rl_small.rollout.base import SamplingSpec
from rl_small.types import Prompt, Rollout


class FakeBackend:
    """Returns ``completions[k % len]`` for the k-th requested completion; tokenizes them for real."""

    def __init__(self, tokenizer: Any, completions: list[str]) -> None:
        if not completions:
            raise ValueError("fake backend needs rollout.fake_completions (a non-empty list of strings)")
        self.tokenizer = tokenizer
        self.completions = completions
        self.version = 0
        self._k = 0

    def generate(self, prompts: list[Prompt], sampling: SamplingSpec) -> list[Rollout]:
        out = []
        for gid, p in enumerate(prompts):
            prompt_ids = self.tokenizer(p.text, add_special_tokens=False)["input_ids"]
            for _ in range(sampling.n):
                text = self.completions[self._k % len(self.completions)]
                self._k += 1
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: sampling.max_new_tokens]
                truncated = len(ids) == sampling.max_new_tokens
                if not truncated and self.tokenizer.eos_token_id is not None:
                    ids = ids + [self.tokenizer.eos_token_id]
                out.append(Rollout(p, gid, prompt_ids, ids, text, None, truncated, self.version))
        return out

    def sync(self, weights: Path | Any, version: int) -> None:
        self.version = version

    def close(self) -> None:
        pass
