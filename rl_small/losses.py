"""Policy-gradient losses: pure tensor functions with shapes in the docstrings.

    pg, clipped = clipped_policy_loss(logp, old_logp, adv, 0.2, 0.28, dual_clip=3.0)   # (B, T) each
    pg, metrics = policy_loss(logp, old_logp, sampler_logp, adv, mask, cfg.algo)       # algo.policy_loss + tis_*
    kl = KL_ESTIMATORS["k3"](logp, ref_logp)                                            # (B, T)
    vl, vclipped = value_loss(values, old_values, returns, clip=0.2)                    # (B, T) each
    loss = aggregate(pg, mask, "token_mean") + beta * aggregate(kl, mask, "token_mean")

All per-token tensors are (B, T) with ``mask`` (B, T) = 1 on completion tokens and 0 on padding. Every
per-token term is reduced with ``aggregate``, so micro-batches with gradient accumulation add up to the
full-batch loss when the global ``num_seqs`` / ``num_tokens`` are passed (docs/METHODS.md §2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from rl_small.policy_losses import Metrics, register_policy_loss, resolve_policy_loss

LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
ISMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def is_weights(
    old_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor | None = None,
    mode: ISMode = "token_truncate",
    low: float | None = None,
    high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights pi_old / pi_sampler for the sampler/trainer mismatch (other kernels, a stale adapter
    version), with TRL's ``vllm_importance_sampling_mode`` semantics (verl: rollout correction):
    token_*: one ratio per token; sequence_*: one per sequence, exp(sum over its ``mask`` tokens of
    log pi_old - log pi_sampler), shared by its tokens. *_truncate: clamp to [low, high] (Yao et al. 2025,
    "Your efficient RL framework secretly brings you off-policy RL training"); *_mask: a ratio outside
    [low, high] becomes 0 (the token / sequence leaves the loss), the others keep their ratio. A bound of None
    is no bound. old_logp, sampler_logp, mask: (B, T) (mask: 1 on completion tokens; needed for sequence_*).
    Returns (detached weights (B, T), 1 where a bound was hit (B, T))."""
    diff = (old_logp - sampler_logp).detach()
    if mode.startswith("sequence"):
        if mask is None:
            raise ValueError(f"importance sampling mode {mode!r} needs the completion mask")
        diff = torch.where(mask.to(diff.device) > 0, diff, 0.0).sum(-1, keepdim=True).expand_as(diff)
    ratio = torch.exp(diff)
    out = (ratio > high) if high is not None else torch.zeros_like(ratio, dtype=torch.bool)
    if low is not None:
        out = out | (ratio < low)
    if mode.endswith("truncate"):
        return ratio.clamp(min=low, max=high), out.float()
    if mode.endswith("mask"):
        return ratio.masked_fill(out, 0.0), out.float()
    raise ValueError(f"unknown importance sampling mode {mode!r}")


def tis_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated token weights w = min(pi_old / pi_sampler, cap): ``is_weights`` in mode token_truncate.
    Both (B, T); returns (detached weights (B, T), 1 where the cap bound)."""
    return is_weights(old_logp, sampler_logp, None, "token_truncate", None, cap)


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate L = -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) (Schulman 2017; DAPO clip-higher
    arXiv 2503.14476 when eps_high > eps_low).

    ``dual_clip`` = c > 1 adds the dual-clip lower bound of Ye et al. 2020 (arXiv 1912.09729) for A < 0:
    L = min(L, -c A), so a very large ratio on a negative-advantage token cannot blow the loss up.
    logp, old_logp: (B, T); advantages: (B,) or (B, T). Returns (loss (B, T), clipped indicator (B, T)); the
    indicator is 1 where the clipped branch (or the dual-clip bound) is the active one.
    """
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    active = clipped < unclipped
    if dual_clip is not None:
        bound = -dual_clip * adv
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        active = active | dual
    return loss, active.float()


# ---- the policy-loss registry's entries (rl_small.policy_losses: the signature, plug-ins by import path) -----
def _per_token(advantages: torch.Tensor) -> torch.Tensor:
    return advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages


@register_policy_loss("clipped")
def clipped_loss(logp: torch.Tensor, old_logp: torch.Tensor, sampler_logp: torch.Tensor | None,
                 advantages: torch.Tensor, mask: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, Metrics]:
    """PPO / GRPO clipped surrogate with ``cfg.clip`` = (eps_low, eps_high) (clip-higher when eps_high >
    eps_low) and ``cfg.dual_clip`` (``clipped_policy_loss``). (B, T) tensors in, (B, T) loss out."""
    loss, clipped = clipped_policy_loss(logp, old_logp, advantages, *cfg.clip, dual_clip=cfg.dual_clip)
    return loss, {"loss/clip_frac": clipped}


@register_policy_loss("gspo")
def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, sampler_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, Metrics]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): the sequence ratio s_i = exp(mean over the sequence's
    ``mask`` tokens of log pi - log pi_old), clipped to [1 - eps_low, 1 + eps_high] = ``cfg.gspo_clip``
    (3e-4, 4e-4 in the paper); L_i = -min(s_i A, clip(s_i) A), the same value on every token of sequence i
    (TRL's importance_sampling_level="sequence"). The gradient reaches every token through the mean: ds_i /
    dlogp_t = s_i / |y_i|, so a token-mean aggregation gives the paper's gradient s_i A_i sum_t grad logp_t
    per sequence (GSPO-token), and seq_mean_token_mean gives the paper's objective exactly.
    (B, T) tensors in (advantages (B,) or (B, T)), (B, T) loss out; clip_frac: the tokens of clipped sequences."""
    valid = mask.to(logp.device) > 0
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    ratio = torch.exp(torch.where(valid, logp - old_logp, 0.0).sum(-1, keepdim=True) / n)  # (B, 1)
    adv = _per_token(advantages).expand_as(logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - cfg.gspo_clip[0], 1 + cfg.gspo_clip[1]) * adv
    return -torch.minimum(unclipped, clipped), {"loss/clip_frac": (clipped < unclipped).float()}


@register_policy_loss("cispo")
def cispo_loss(logp: torch.Tensor, old_logp: torch.Tensor, sampler_logp: torch.Tensor | None,
               advantages: torch.Tensor, mask: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, Metrics]:
    """CISPO (MiniMax-M1, arXiv 2506.13585; TRL loss_type="cispo"): L = -sg(min(pi / pi_old, cap)) A log pi,
    cap = ``cfg.cispo_cap`` (TRL's epsilon_high for cispo, 5.0 in ScaleRL). The weight is clipped, not the
    objective, so every token keeps a gradient A * w * grad log pi. (B, T) in, (B, T) loss out; clip_frac:
    the tokens whose weight was capped."""
    ratio = torch.exp(logp - old_logp).detach()
    loss = -ratio.clamp(max=cfg.cispo_cap) * _per_token(advantages) * logp
    return loss, {"loss/clip_frac": (ratio > cfg.cispo_cap).float()}


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, sampler_logp: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, Metrics]:
    """The policy loss ``cfg.policy_loss`` (a registered name or an import path), then the sampler correction:
    with sampler logprobs and ``cfg.tis_cap`` set, the per-token loss is weighted by ``is_weights`` (mode
    ``cfg.tis_mode``, bounds [``cfg.tis_min``, ``cfg.tis_cap``]). logp (with its graph), old_logp,
    sampler_logp, mask: (B, T); advantages (B,) or (B, T). Returns (per-token loss (B, T), metrics: name ->
    (B, T) per-token values that the trainer logs as their token mean over ``mask``)."""
    loss, metrics = resolve_policy_loss(cfg.policy_loss)(logp, old_logp, sampler_logp, advantages, mask, cfg)
    if sampler_logp is not None:  # sampler/trainer mismatch (vLLM kernels, stale adapter version)
        metrics["rollout/sampler_logp_absdiff"] = (old_logp - sampler_logp).abs()
        if cfg.tis_cap is not None:
            w, bound = is_weights(old_logp, sampler_logp, mask, cfg.tis_mode, cfg.tis_min, cfg.tis_cap)
            loss = loss * w
            metrics["rollout/tis_mask_frac" if cfg.tis_mode.endswith("mask") else "rollout/tis_cap_frac"] = bound
    return loss, metrics


# ---- KL to the reference (Schulman, "Approximating KL Divergence", 2020) --------------------------------
# Tokens are sampled from pi_theta; with r = pi_ref / pi_theta each estimator's expectation is KL(pi || ref):
#   k1 = -log r (unbiased, high variance, can be negative), k2 = (log r)^2 / 2 (biased, low variance),
#   k3 = r - 1 - log r (unbiased, low variance, always >= 0; GRPO's choice). docs/METHODS.md §2 writes k1 = log r;
#   with r = pi_ref / pi that is minus the KL, so k1 here is log pi - log pi_ref, the estimator of the note.
KLFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = -log r = log pi - log pi_ref per token; (B, T), (B, T) -> (B, T)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = (log r)^2 / 2 per token; (B, T), (B, T) -> (B, T)."""
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: r - 1 - log r with r = pi_ref / pi; (B, T) -> (B, T)."""
    log_r = ref_logp - logp
    return torch.exp(log_r) - 1 - log_r


KL_ESTIMATORS: dict[str, KLFn] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float | None = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped PPO value loss per token: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2).

    values, old_values, returns: (B, T). ``clip`` None = the plain 0.5 (V - R)^2. Returns (loss (B, T),
    indicator (B, T) that the clipped branch is the larger one). Clipping the value change like the ratio is
    the PPO2 / OpenAI baselines form; verl and OpenRLHF use the same.
    """
    plain = (values - returns) ** 2
    if clip is None:
        return 0.5 * plain, torch.zeros_like(plain)
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), (clipped > plain).float()


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAgg,
    norm_len: int | None = None,
    num_seqs: float | None = None,
    num_tokens: float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar over the ``mask`` tokens.

    token_mean: sum / number of tokens (DAPO). seq_mean_token_mean: mean over sequences of each sequence's
    token mean (GRPO). seq_mean_token_sum_norm: sum / (B * norm_len), a constant normaliser independent of
    the responses' lengths (Dr. GRPO); ``norm_len`` defaults to T.
    For gradient accumulation pass the *global* ``num_seqs`` / ``num_tokens`` of the whole batch: the
    micro-batch results then add up exactly to the full-batch value. Under data parallelism they are the
    global counts divided by the process count (DDP averages gradients), so they may be fractions; a count of 0
    (nothing in the loss) divides by 1.
    """
    mask = mask.to(loss.dtype)
    masked = loss * mask
    if mode == "token_mean":
        denom = (num_tokens or 1.0) if num_tokens is not None else mask.sum().clamp(min=1)
        return masked.sum() / denom
    n = (num_seqs or 1.0) if num_seqs is not None else max(loss.shape[0], 1)
    if mode == "seq_mean_token_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n
    if mode == "seq_mean_token_sum_norm":
        return masked.sum() / (n * (norm_len or loss.shape[1]))
    raise ValueError(f"unknown loss aggregation {mode!r}")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(target) per position: logits (B, T, V), targets (B, T) -> (B, T); logits divided by temperature."""
    return token_logprobs_and_entropy(logits, targets, temperature, entropy=False)[0]


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    entropy: bool = True,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(target) (B, T) and the entropy H = -sum_v p_v log p_v (B, T) of each position's distribution,
    both fp32 from one pass over ``logits`` (B, T, V) / temperature in row chunks (rl_small.head: no full fp32
    copy or log-softmax of the logits); entropy is None when not asked for. With ``entropy_grad`` the
    entropy keeps its graph (an entropy bonus); without, it is a detached metric."""
    from rl_small.head import logits_logprobs

    return logits_logprobs(logits, targets, temperature, entropy=entropy, entropy_grad=entropy and entropy_grad)
