"""Policy-gradient losses: pure tensor functions with shapes in the docstrings.

All per-token tensors are (B, T) with ``mask`` (B, T) = 1 on completion tokens and 0 on padding.
"""

from __future__ import annotations

from typing import Literal

import torch

LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate L = -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) (Schulman 2017; DAPO clip-higher
    arXiv 2503.14476 when eps_high > eps_low).

    logp, old_logp: (B, T); advantages: (B,) or (B, T). Returns (loss (B, T), clipped indicator (B, T)).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).float()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: r - 1 - log r with r = pi_ref / pi; (B, T) -> (B, T)."""
    log_r = ref_logp - logp
    return torch.exp(log_r) - 1 - log_r


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAgg,
    norm_len: int | None = None,
    num_seqs: int | None = None,
    num_tokens: float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar over the ``mask`` tokens.

    token_mean: sum / number of tokens (DAPO). seq_mean_token_mean: mean over sequences of each sequence's
    token mean (GRPO). seq_mean_token_sum_norm: sum / (B * norm_len), a constant normaliser independent of
    the responses' lengths (Dr. GRPO); ``norm_len`` defaults to T.
    For gradient accumulation pass the *global* ``num_seqs`` / ``num_tokens`` of the whole batch: the
    micro-batch results then add up exactly to the full-batch value.
    """
    mask = mask.to(loss.dtype)
    masked = loss * mask
    if mode == "token_mean":
        denom = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
        return masked.sum() / denom
    n = num_seqs if num_seqs is not None else loss.shape[0]
    if mode == "seq_mean_token_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n
    if mode == "seq_mean_token_sum_norm":
        return masked.sum() / (n * (norm_len or loss.shape[1]))
    raise ValueError(f"unknown loss aggregation {mode!r}")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(target) per position: logits (B, T, V), targets (B, T) -> (B, T); logits divided by temperature."""
    logits = logits.float()
    if temperature not in (0, 1):
        logits = logits / temperature
    return torch.gather(torch.log_softmax(logits, dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)
