"""The protocol between the trainer and generation (the factory, ``make_backend``, is in factory.py).

    backend = make_backend(cfg.rollout, model, tokenizer)
    rollouts = backend.generate(prompts, SamplingSpec(n=8, max_new_tokens=128, temperature=1.0))
    backend.sync(adapter_dir_or_model, version=step)

``generate`` returns prompt-major groups: the n completions of ``prompts[i]`` are
``rollouts[i*n:(i+1)*n]`` and share ``group_id == i``; ``as_groups(prompts, rollouts, n)`` makes them typed
``Group``s, the unit every later stage works on. Every rollout carries its token ids, the sampler's
per-token logprobs when the backend has them, and the policy version that produced it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rl_small.types import Group, Prompt, Rollout


class RolloutError(RuntimeError):
    """Generation failed for good (after retries) or the request itself is wrong."""


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters of one generate call."""

    n: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks: fixed completion lengths)


class RolloutBackend(Protocol):
    """What the trainer needs from generation."""

    version: int

    def generate(self, prompts: list[Prompt], sampling: SamplingSpec) -> list[Rollout]: ...

    def sync(self, weights: Path | Any, version: int) -> None: ...

    def close(self) -> None: ...


def export_weights(weights: Path | Any, root: Path, version: int, tokenizer: Any) -> tuple[Path, bool]:
    """Write the policy where a sampler can read it: ``root/v{version}`` (the LoRA adapter only, MBs) for a
    PEFT model, ``root/full-v{version}`` (full weights + tokenizer) otherwise; a folder is used as it is.
    Returns (folder, is_adapter)."""
    if isinstance(weights, (str, Path)):
        path = Path(weights)
        return path, (path / "adapter_config.json").exists()
    if hasattr(weights, "peft_config"):
        path = root / f"v{version}"
        tmp = root / f".v{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        weights.save_pretrained(tmp, selected_adapters=["default"])  # not a PPO critic adapter
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)  # a server never sees a half-written adapter
        return path, True
    path = root / f"full-v{version}"
    weights.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, False


def expand_requests(n_prompts: int, sampling: SamplingSpec) -> list[tuple[int, int]]:
    """(prompt index, completions) per request: one request of n per prompt; vLLM refuses n > 1 when greedy,
    so greedy groups become n requests of one."""
    if sampling.temperature == 0 and sampling.n > 1:
        return [(i, 1) for i in range(n_prompts) for _ in range(sampling.n)]
    return [(i, sampling.n) for i in range(n_prompts)]


def make_rollout(
    prompt: Prompt, gid: int, prompt_ids: list[int], ids: list[int], logprobs: list[float] | None,
    finish_reason: str | None, version: int, tokenizer: Any,
) -> Rollout:
    """A rollout from a vLLM completion (token ids include the EOS token when it stopped there)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return Rollout(prompt, gid, list(prompt_ids), list(ids), text, logprobs, finish_reason == "length", version)


def as_groups(prompts: list[Prompt], rollouts: list[Rollout], n: int) -> list[Group]:
    """The prompt-major output of ``generate(prompts, SamplingSpec(n=n))`` as one unscored ``Group`` per prompt,
    by position; a backend that broke the contract (count or order) is an error naming what it returned."""
    if len(rollouts) != len(prompts) * n:
        raise RolloutError(f"the backend returned {len(rollouts)} rollouts for {len(prompts)} prompts x n={n}")
    groups = [Group(p, rollouts[i * n : (i + 1) * n]) for i, p in enumerate(prompts)]
    for i, g in enumerate(groups):
        bad = next((r for r in g.rollouts if r.prompt is not g.prompt and r.prompt.id != g.prompt.id), None)
        if bad is not None:
            raise RolloutError(f"rollouts {i * n}..{(i + 1) * n - 1} should answer prompt {g.prompt.id!r} "
                               f"(prompt-major order), one answers {bad.prompt.id!r}")
    return groups
