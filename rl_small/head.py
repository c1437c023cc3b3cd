"""The log-prob head: log pi(target) and the entropy per position, in chunks, never a full fp32 (N, V) tensor.

    logp, ent = lm_head_logprobs(hidden, lm_head.weight, None, targets, temperature)  # (N, H) -> (N,), (N,)
    logp, ent = logits_logprobs(logits, targets, temperature)                          # (..., V) -> (...), (...)

The naive head (full logits, ``.float()``, ``log_softmax``) holds several (N, V) fp32 tensors per micro-batch:
for R1-Distill's micro-batch (4 x 3,584 tokens, vocabulary 151,936) each is 8.7 GB. Here the rows are
processed ``chunk_rows(V)`` at a time (one chunk's fp32 logits alive at once) in a custom autograd function:

- ``lm_head_logprobs`` projects hidden states through a frozen LM head chunk by chunk (the full logits never
  exist) and, when a gradient will be needed, computes it in the forward pass like Liger's fused linear
  cross-entropy: d logp_n / d h_n = (W[t_n] - sum_v p_nv W_v) / T and d H_n / d h_n =
  -sum_v p_nv (log p_nv + H_n) W_v / T are (N, H) vectors, so backward is a row scaling and saves no logits
  and needs no second projection. The LM head weight must be frozen (LoRA); it gets no gradient.
- ``logits_logprobs`` takes logits that already exist (any dtype) and saves nothing vocabulary-sized of its
  own; backward recomputes each chunk's log-softmax and writes the logits' gradient in their own dtype.

Entropy is computed only when asked for (``entropy``) and keeps its graph only with ``entropy_grad``.
"""

from __future__ import annotations

from typing import Any

import torch

# fp32 elements per (rows, V) chunk buffer: 64 MiB, 110 rows at V = 151,936 (a few such buffers are alive at
# once). Smaller chunks make the LM-head matmuls less efficient on CPU (bf16 at 55 rows: about 1.4x slower).
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that one fp32 (rows, vocab) buffer holds about ``elements`` values."""
    return max(1, elements // max(vocab, 1))


def _stats(z: torch.Tensor, t: torch.Tensor, entropy: bool, probs: bool) -> tuple[Any, ...]:
    """From fp32 scaled logits z (c, V): log-softmax (c, V), log p(t) (c,), probabilities (c, V) (None unless
    ``probs`` or ``entropy``), entropy (c,) (empty unless ``entropy``)."""
    lsm = torch.log_softmax(z, dim=-1)
    logp = lsm.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    p = lsm.exp() if probs or entropy else None
    # -sum_v p_v log p_v as a batched dot product: no (c, V) temporary
    ent = -torch.einsum("cv,cv->c", p, lsm) if p is not None and entropy else lsm.new_zeros(0)
    return lsm, logp, p, ent


def _dlogits(
    lsm: torch.Tensor, t: torch.Tensor, p: torch.Tensor, ent: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d log p(t) / dz = onehot(t) - p and d H / dz = -p (log p + H), both (c, V) fp32 (the second if ent).
    ``lsm`` and ``p`` are overwritten (they are not needed afterwards)."""
    d_ent = None if ent is None else lsm.add_(ent.unsqueeze(-1)).mul_(p).neg_()
    d_lp = p.neg_()
    d_lp.scatter_add_(-1, t.unsqueeze(-1), torch.ones_like(t, dtype=p.dtype).unsqueeze(-1))
    return d_lp, d_ent


class _LMHead(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), bias (V,) | None, targets (N,)) -> log p(t) (N,), entropy (N,) | (0,)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor, temp: float,
        entropy: bool, entropy_grad: bool, rows: int, need: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=h.device)
        ent = torch.empty(n if entropy else 0, dtype=torch.float32, device=h.device)
        g_lp = torch.empty((n, h.shape[1]) if need else (0,), dtype=torch.float32, device=h.device)
        g_ent = torch.empty((n, h.shape[1]) if need and entropy and entropy_grad else (0,), dtype=torch.float32,
                            device=h.device)
        for s in range(0, n, rows):
            sl = slice(s, min(s + rows, n))
            # h in the head's dtype (hidden states can come out of an autocast region in another one)
            z = torch.nn.functional.linear(h[sl].to(w.dtype), w, b).float()  # a fresh buffer: scaled in place
            if temp not in (0, 1):
                z.div_(temp)
            lsm, logp[sl], p, e = _stats(z, t[sl], entropy, probs=need)
            del z
            if entropy:
                ent[sl] = e
            if need:
                d_lp, d_ent = _dlogits(lsm, t[sl], p, e if g_ent.numel() else None)
                scale = 1.0 if temp in (0, 1) else 1.0 / temp
                g_lp[sl] = (d_lp.to(w.dtype) @ w).float() * scale
                if d_ent is not None:
                    g_ent[sl] = (d_ent.to(w.dtype) @ w).float() * scale
                del d_lp, d_ent
            # free this chunk's buffers before the next chunk allocates its own (else 5 are alive, not 3)
            del lsm, p
        ctx.save_for_backward(g_lp, g_ent)
        ctx.h_dtype = h.dtype
        if not (entropy and entropy_grad):
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx: Any, d_logp: torch.Tensor, d_ent: torch.Tensor | None) -> tuple[Any, ...]:
        g_lp, g_ent = ctx.saved_tensors
        grad = d_logp.unsqueeze(-1) * g_lp
        if d_ent is not None and g_ent.numel():
            grad = grad + d_ent.unsqueeze(-1) * g_ent
        return grad.to(ctx.h_dtype), None, None, None, None, None, None, None, None


def lm_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
    entropy_grad: bool = False,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(target) (N,) fp32 and the entropy (N,) (None unless ``entropy``) of softmax((h W^T + b) / T),
    from hidden states (N, H) and a frozen LM head (V, H); gradients flow to ``hidden`` only."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lm_head_logprobs needs a frozen LM head (weight.requires_grad=False): use logits_logprobs")
    rows = rows or chunk_rows(weight.shape[0])
    need = torch.is_grad_enabled() and hidden.requires_grad  # else no gradient vectors are computed
    logp, ent = _LMHead.apply(hidden, weight, bias, targets, temperature, entropy, entropy_grad, rows, need)
    return logp, (ent if entropy else None)


class _LogitsHead(torch.autograd.Function):
    """(logits (N, V), targets (N,)) -> log p(t) (N,), entropy (N,) | (0,); backward recomputes per chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, t: torch.Tensor, temp: float, entropy: bool, entropy_grad: bool, rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = logits.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        ent = torch.empty(n if entropy else 0, dtype=torch.float32, device=logits.device)
        for s in range(0, n, rows):
            sl = slice(s, min(s + rows, n))
            z = logits[sl].float()
            z = z / temp if temp not in (0, 1) else z
            _, logp[sl], _, e = _stats(z, t[sl], entropy, probs=False)
            del z
            if entropy:
                ent[sl] = e
        ctx.save_for_backward(logits, t, ent)
        ctx.temp, ctx.rows, ctx.ent_grad = temp, rows, entropy and entropy_grad
        if not ctx.ent_grad:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx: Any, d_logp: torch.Tensor, d_ent: torch.Tensor | None) -> tuple[Any, ...]:
        logits, t, ent = ctx.saved_tensors
        temp, rows = ctx.temp, ctx.rows
        grad = torch.empty_like(logits)
        use_ent = ctx.ent_grad and d_ent is not None
        for s in range(0, logits.shape[0], rows):
            sl = slice(s, min(s + rows, logits.shape[0]))
            z = logits[sl].float()
            z = z / temp if temp not in (0, 1) else z
            lsm = torch.log_softmax(z, dim=-1)  # a fresh buffer: _dlogits overwrites it, not the logits
            del z
            g_lp, g_ent = _dlogits(lsm, t[sl], lsm.exp(), ent[sl] if use_ent else None)
            g = g_lp * d_logp[sl].unsqueeze(-1)
            if g_ent is not None and d_ent is not None:
                g = g + g_ent * d_ent[sl].unsqueeze(-1)
            grad[sl] = g / temp if temp not in (0, 1) else g
            del lsm, g_lp, g_ent, g
        return grad, None, None, None, None, None


def logits_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
    entropy_grad: bool = False,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(target) and the entropy (None unless ``entropy``) for logits (..., V) of any dtype and targets
    (...); fp32 results shaped like ``targets``. Peak extra memory: a few fp32 (rows, V) chunks (plus, in
    backward, the logits' gradient in their dtype)."""
    shape, v = targets.shape, logits.shape[-1]
    flat, t = logits.reshape(-1, v), targets.reshape(-1)
    rows = rows or chunk_rows(v)
    logp, ent = _LogitsHead.apply(flat, t, temperature, entropy, entropy_grad, rows)
    return logp.reshape(shape), (ent.reshape(shape) if entropy else None)
