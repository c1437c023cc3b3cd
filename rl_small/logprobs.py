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

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from rl_small.head import lm_head_logprobs
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


class _RecordingLayer(DynamicLayer):
    """A prompt-forward cache layer: keeps the first (key, value) it sees and returns the call's own states.

    A gradient-checkpointing replay of the layer calls ``update`` again with recomputed states; they are
    returned (the prompt has no past) and not stored, so the replay neither grows the cache nor changes it."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.is_initialized:
            self.keys, self.values, self.device, self.is_initialized = (
                key_states,
                value_states,
                key_states.device,
                True,
            )
        return key_states, value_states


class _PrefixLayer(DynamicLayer):
    """A read-only completion-forward cache layer: ``update`` returns prefix + new states and stores nothing,
    so a checkpointing replay sees exactly what the first pass saw."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


@contextmanager
def _cache_under_checkpointing(model: Any) -> Iterator[None]:
    """Let checkpointed decoder layers keep the cache object (transformers drops it: a replay would append to a
    normal cache twice); safe here because both cache layers above are replay-idempotent."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache  # back to the class attribute


def _unwrap(model: Any) -> Any:
    """The transformers model inside DDP and PEFT wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_kwarg(model: Any) -> str:
    """``cache`` on transformers >= 5.24, ``past_key_values`` before (read off the wrapped model's forward;
    under DDP the wrapper's ``forward(*inputs, **kwargs)`` says nothing, so it is unwrapped first)."""
    return "cache" if "cache" in inspect.signature(_unwrap(model).forward).parameters else "past_key_values"


def _output_embeddings(model: Any) -> torch.nn.Module | None:
    """The LM head of a causal LM, through DDP and PEFT wrappers (None if it has none)."""
    get = getattr(_unwrap(model), "get_output_embeddings", None)
    return get() if callable(get) else None


def _contiguous_input(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook of the LM head: a contiguous input. With ``logits_to_keep=1`` the head gets
    ``hidden[:, -1:]``, a non-contiguous (B, 1, H) view; under autograd ``torch.matmul`` then does not fold it to
    one matrix product but broadcasts the (V, H) weight to a batched product, and on CPU the expanded weight is
    copied: a (B, H, V) temporary, measured 1.2 GB for 16 sequences at Qwen2's vocabulary and hidden 256."""
    return (args[0].contiguous(), *args[1:]) if args and isinstance(args[0], torch.Tensor) else args


def shared_prefix_forward(
    model: Any, rollouts: list[Rollout], pad_id: int, hidden: bool = False, states_of: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run every prompt once and its completions on the prompt's KV cache.

    Returns (out, completion ids (B, C), completion mask (B, C)), completions left-aligned. ``out`` (B, C, V)
    are the logits that *predict* completion token t at position t (a causal LM); with ``hidden`` = True,
    ``model`` is a bare decoder (e.g. ``LlamaModel``) and ``out`` (B, C, H) are its last hidden states at the
    same positions, i.e. the states a value head reads for V(s_t) before token t. ``states_of`` = the decoder
    of the causal LM ``model``: ``out`` are that decoder's last hidden states (B, C, H), the LM head's input, and
    logits are computed for one position per sequence only (``lm_head_logprobs`` projects chunks). Works with gradient
    checkpointing (exact gradients; the cache layers are replay-safe, see ``_cache_under_checkpointing``).
    """
    prompt_keys: dict[tuple[int, ...], int] = {}
    rows = []
    for r in rollouts:
        rows.append(prompt_keys.setdefault(tuple(r.prompt_ids), len(prompt_keys)))
    dev = next(model.parameters()).device  # the batch is built on the CPU; the model may sit on a GPU
    p_ids, p_attn = (t.to(dev) for t in _left_pad([list(k) for k in prompt_keys], pad_id))
    p_pos = (p_attn.cumsum(-1) - 1).clamp(min=0)
    extra = {} if hidden else {"logits_to_keep": 1}
    extra_c = extra if states_of is not None else {}
    captured: list[torch.Tensor] = []  # the decoder's last hidden states of the two forwards (states_of)
    idx = torch.tensor(rows, dtype=torch.long, device=dev)
    c_ids, c_mask = (t.to(dev) for t in _right_pad([r.completion_ids for r in rollouts], pad_id))
    attn = torch.cat([p_attn[idx], c_mask.long()], dim=1)
    c_pos = p_attn.sum(-1)[idx].unsqueeze(1) + torch.arange(c_ids.shape[1], device=dev).unsqueeze(0)
    cache_kw = _cache_kwarg(model)
    prompt_cache = DynamicCache()
    prompt_cache.layer_class_to_replicate = _RecordingLayer
    hooks = [states_of.register_forward_hook(lambda _m, _a, o: captured.append(o[0]))] if states_of else []
    head = None if hidden else _output_embeddings(model)
    if head is not None:  # logits_to_keep=1 hands the head a strided (B, 1, H) slice: see _contiguous_input
        hooks.append(head.register_forward_pre_hook(_contiguous_input))
    try:
        with _cache_under_checkpointing(model):
            out = model(
                input_ids=p_ids, attention_mask=p_attn, position_ids=p_pos, use_cache=False,
                **{cache_kw: prompt_cache}, **extra,
            )
            # differentiable indexing: gradients flow back into the shared prefix
            cache = DynamicCache()
            cache.layers = [_PrefixLayer(layer.keys[idx], layer.values[idx]) for layer in prompt_cache.layers]
            out_c = model(
                input_ids=c_ids, attention_mask=attn, position_ids=c_pos, use_cache=False, **{cache_kw: cache},
                **extra_c,
            )
    finally:
        for h in hooks:
            h.remove()
    # The prompt's last position predicts completion token 0; completion position t predicts token t+1.
    if captured:
        states = torch.cat([captured[0][:, -1:][idx], captured[1][:, :-1]], dim=1)
    elif hidden:
        states = torch.cat([out.last_hidden_state[:, -1:][idx], out_c.last_hidden_state[:, :-1]], dim=1)
    else:
        states = torch.cat([out.logits[:, -1:][idx], out_c.logits[:, :-1]], dim=1)
    return states, c_ids, c_mask


def lm_head_parts(model: Any) -> tuple[Any, torch.nn.Linear] | None:
    """(decoder, LM head) of a causal LM (PEFT- and DDP-unwrapped) when the chunked head applies: a plain,
    frozen, unsharded ``nn.Linear`` head and no logit soft-capping. None otherwise (FSDP / ZeRO-3 sharded
    weights, a trainable or LoRA-wrapped head): the caller then uses the model's own logits."""
    from transformers import PreTrainedModel

    base = _unwrap(model)
    if not isinstance(base, PreTrainedModel) or getattr(base.config, "final_logit_softcapping", None):
        return None
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None
    w = head.weight
    sharded = hasattr(w, "ds_id") or type(w.data) is not torch.Tensor or w.shape[-1] != base.config.hidden_size
    if w.requires_grad or sharded:
        return None
    return base.get_decoder(), head


def completion_logprobs(
    model: Any, rollouts: list[Rollout], pad_id: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(completion tokens) (B, C) and their mask (B, C), completions left-aligned; prefix shared."""
    logp, mask, _ = completion_logprobs_and_entropy(model, rollouts, pad_id, temperature, entropy=False)
    return logp, mask


def completion_logprobs_and_entropy(
    model: Any,
    rollouts: list[Rollout],
    pad_id: int,
    temperature: float = 1.0,
    entropy: bool = True,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Like ``completion_logprobs`` plus the per-token entropy (B, C) of the policy (None unless ``entropy``),
    from the same forward and pass over the vocabulary; the entropy is detached unless ``entropy_grad``.

    The LM head runs chunk by chunk on the decoder's hidden states of the completion tokens only
    (``rl_small.head.lm_head_logprobs``: no (B, C, V) logits exist); padding positions hold 0. Where the
    head cannot be used directly (``lm_head_parts`` is None) the model's logits go through the chunked
    ``token_logprobs_and_entropy``."""
    parts = lm_head_parts(model)
    if parts is None:
        logits, c_ids, c_mask = shared_prefix_forward(model, rollouts, pad_id)
        logp, ent = token_logprobs_and_entropy(logits, c_ids, temperature, entropy, entropy_grad)
        return logp, c_mask, ent
    decoder, head = parts
    hidden, c_ids, c_mask = shared_prefix_forward(model, rollouts, pad_id, states_of=decoder)
    sel = c_mask.to(hidden.device).bool()
    pos = sel.nonzero(as_tuple=True)
    lp, ent = lm_head_logprobs(
        hidden[pos], head.weight, head.bias, c_ids.to(hidden.device)[pos], temperature, entropy, entropy_grad
    )
    zeros = torch.zeros(sel.shape, dtype=lp.dtype, device=lp.device)
    return zeros.index_put(pos, lp), c_mask, None if ent is None else zeros.index_put(pos, ent)


def completion_logprobs_naive(
    model: Any, rollouts: list[Rollout], pad_id: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one full forward per prompt+completion; same layout as ``completion_logprobs``."""
    out_lp: list[torch.Tensor] = []
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
