"""Typed records passed between the stages of a training step.

Prompt -> (rollout backend) -> Rollout -> Group (one prompt's G rollouts, scored by the rewards) ->
(old/ref/values, advantages) -> TrainBatch. The group is the unit of data from generation to the batch: filters
keep or drop whole groups, and a batch's group structure is its list of groups, never re-derived from ids.
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
    group_id: int  # index of its prompt in the generate() call that produced it (its place in a batch: its Group's)
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
class Group:
    """One prompt and its G rollouts, with each rollout's total reward and each reward component's scores
    (None = the component abstained), filled by scoring (rl_small.rollout.stream). ``weight`` 0: a filler group
    of dynamic sampling, in the batch only to give every process the same shape, out of the loss."""

    prompt: Prompt
    rollouts: list[Rollout]
    rewards: list[float] = field(default_factory=list)  # (G,) weighted total per rollout
    components: dict[str, list[float | None]] = field(default_factory=dict)  # name -> (G,) scores
    weight: float = 1.0

    def scores(self, i: int) -> dict[str, float | None]:
        """Rollout ``i``'s score from each component."""
        return {k: v[i] for k, v in self.components.items()}


def flat_rollouts(groups: list[Group]) -> list[Rollout]:
    """The rollouts of ``groups`` in batch order (group after group)."""
    return [r for g in groups for r in g.rollouts]


@dataclass
class TrainBatch:
    """One step's groups as right-padded per-token tensors (N sequences, T = longest completion).

    Filled stage by stage: ``mask``/``rewards``/``loss_weight`` when built, ``old_logp``/``ref_logp``/
    ``old_values`` by the no-grad pass, ``advantages``/``returns`` by the advantage stage. Tensors the run does
    not need stay None. Completions are left-aligned, so a micro-batch's (b, t) tensors are ``x[rows, :t]``.
    """

    rollouts: list[Rollout]
    group_rows: list[list[int]]  # the row indices of each group, in batch order
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
