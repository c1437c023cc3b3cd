"""Typed records passed between the stages of a training step.

Prompt -> (rollout backend) -> Rollout -> (rewards) -> ScoredRollout -> (old/ref/values, advantages) -> TrainBatch.
Token ids and sampler logprobs travel with every rollout, so any backend (hf, vLLM) fits the same loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class Prompt:
    """One task item rendered for the model. ``columns`` are the dataset columns given to rewards."""

    id: str
    text: str  # chat template already applied
    answer: str
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    """One completion of one prompt, as produced by a rollout backend."""

    prompt: Prompt
    group_id: int  # completions of the same prompt in the same step share it
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    sampler_logprobs: list[float] | None  # per completion token, from the sampler (None: not provided)
    truncated: bool  # stopped by max_new_tokens, not by EOS
    version: int  # adapter/policy version that generated it


def batch_columns(rollouts: list[Rollout]) -> dict[str, list[Any]]:
    """The dataset columns of each rollout's prompt as keyword lists for rewards (``answer`` included)."""
    columns: dict[str, list[Any]] = {}
    for r in rollouts:
        for k, v in r.prompt.columns.items():
            columns.setdefault(k, []).append(v)
    columns["answer"] = [r.prompt.answer for r in rollouts]
    return columns


@dataclass
class ScoredRollout:
    """A rollout with its total reward and each component's score (None = the component abstained).
    ``weight`` 0: in the batch only to give every process the same shape (a filler group), out of the loss."""

    rollout: Rollout
    reward: float
    components: dict[str, float | None]
    weight: float = 1.0


@dataclass
class TrainBatch:
    """One step's scored rollouts as right-padded per-token tensors (N sequences, T = longest completion).

    Filled stage by stage: ``mask``/``rewards``/``loss_weight`` when built, ``old_logp``/``ref_logp``/
    ``old_values`` by the no-grad pass, ``advantages``/``returns`` by the advantage stage. Tensors the run does
    not need stay None. Completions are left-aligned, so a micro-batch's (b, t) tensors are ``x[rows, :t]``.
    """

    rollouts: list[Rollout]
    rewards: torch.Tensor  # (N,) float
    group_ids: torch.Tensor  # (N,) long
    mask: torch.Tensor  # (N, T) 1 on completion tokens
    loss_weight: torch.Tensor  # (N,) 0 for sequences left out of the policy loss (overlong filtering), else 1
    old_logp: torch.Tensor | None = None  # (N, T) log pi_old, frozen before the first update
    ref_logp: torch.Tensor | None = None  # (N, T) log pi_ref (base model, adapter off)
    old_values: torch.Tensor | None = None  # (N, T) critic values before the update (ppo)
    sampler_logp: torch.Tensor | None = None  # (N, T) log pi_sampler reported by the backend (vLLM), else None
    advantages: torch.Tensor | None = None  # (N, T)
    returns: torch.Tensor | None = None  # (N, T) value targets (ppo)
