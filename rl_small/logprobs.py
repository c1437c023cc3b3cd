"""Per-token log-probabilities of completions under the policy, computed once per prompt prefix.

    logp, mask = completion_logprobs(model, rollouts, pad_id, temperature)   # (B, C), (B, C)
    logp, mask, entropy = completion_logprobs_and_entropy(model, rollouts, pad_id, temperature)
    hidden, ids, mask = shared_prefix_forward(decoder, rollouts, pad_id, hidden=True)  # value heads

The G completions of a prompt share its prefix: the prompt is run once (with gradient), its KV cache is
indexed out to the G completions, and only the completion tokens are run per sequence. The result and its
gradient equal a full forward of every prompt+completion (``completion_logprobs_naive``, kept as the
reference the tests compare against) at about half the cost for GRPO-sized groups.
"""

from __future__ import annotations

from typing import Any

import torch

from rl_small.losses import token_logprobs, token_logprobs_and_entropy
from rl_small.types import Rollout


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        attn[i, width - len(s) :] = 1
    return ids, attn


def _right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(max(len(s) for s in seqs), 1)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def shared_prefix_forward(
    model: Any, rollouts: list[Rollout], pad_id: int, hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run every prompt once and its completions on the prompt's KV cache.

    Returns (out, completion ids (B, C), completion mask (B, C)), completions left-aligned. ``out`` (B, C, V)
    are the logits that *predict* completion token t at position t (a causal LM); with ``hidden`` = True,
    ``model`` is a bare decoder (e.g. ``LlamaModel``) and ``out`` (B, C, H) are its last hidden states at the
    same positions, i.e. the states a value head reads for V(s_t) before token t.
    """
    prompt_keys: dict[tuple[int, ...], int] = {}
    rows = []
    for r in rollouts:
        rows.append(prompt_keys.setdefault(tuple(r.prompt_ids), len(prompt_keys)))
    p_ids, p_attn = _left_pad([list(k) for k in prompt_keys], pad_id)
    p_pos = (p_attn.cumsum(-1) - 1).clamp(min=0)
    extra = {} if hidden else {"logits_to_keep": 1}
    out = model(input_ids=p_ids, attention_mask=p_attn, position_ids=p_pos, use_cache=True, **extra)
    idx = torch.tensor(rows, dtype=torch.long)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers >= 5.24 renamed it
    cache.batch_select_indices(idx)  # differentiable indexing: gradients flow back into the shared prefix
    c_ids, c_mask = _right_pad([r.completion_ids for r in rollouts], pad_id)
    attn = torch.cat([p_attn[idx], c_mask.long()], dim=1)
    c_pos = p_attn.sum(-1)[idx].unsqueeze(1) + torch.arange(c_ids.shape[1]).unsqueeze(0)
    cache_kw = "cache" if hasattr(out, "cache") else "past_key_values"
    out_c = model(input_ids=c_ids, attention_mask=attn, position_ids=c_pos, use_cache=False, **{cache_kw: cache})
    # The prompt's last position predicts completion token 0; completion position t predicts token t+1.
    if hidden:
        states = torch.cat([out.last_hidden_state[:, -1:][idx], out_c.last_hidden_state[:, :-1]], dim=1)
    else:
        states = torch.cat([out.logits[:, -1:][idx], out_c.logits[:, :-1]], dim=1)
    return states, c_ids, c_mask


def completion_logprobs(
    model: Any, rollouts: list[Rollout], pad_id: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(completion tokens) (B, C) and their mask (B, C), completions left-aligned; prefix shared."""
    logits, c_ids, c_mask = shared_prefix_forward(model, rollouts, pad_id)
    return token_logprobs(logits, c_ids, temperature), c_mask


def completion_logprobs_and_entropy(
    model: Any, rollouts: list[Rollout], pad_id: int, temperature: float = 1.0, entropy_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like ``completion_logprobs`` plus the per-token entropy (B, C) of the policy, from the same forward
    and the same log-softmax (no second pass); the entropy is detached unless ``entropy_grad``."""
    logits, c_ids, c_mask = shared_prefix_forward(model, rollouts, pad_id)
    logp, ent = token_logprobs_and_entropy(logits, c_ids, temperature, entropy_grad=entropy_grad)
    assert ent is not None
    return logp, c_mask, ent


def completion_logprobs_naive(
    model: Any, rollouts: list[Rollout], pad_id: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one full forward per prompt+completion; same layout as ``completion_logprobs``."""
    out_lp, out_mask = [], []
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        logits = model(input_ids=ids).logits[:, len(r.prompt_ids) - 1 : -1]
        out_lp.append(token_logprobs(logits, ids[:, len(r.prompt_ids) :], temperature)[0])
    c = max(max(len(r.completion_ids) for r in rollouts), 1)
    lp = torch.zeros(len(rollouts), c)
    mask = torch.zeros(len(rollouts), c)
    for i, t in enumerate(out_lp):
        lp[i, : len(t)] = t
        mask[i, : len(t)] = 1
    return lp, mask
