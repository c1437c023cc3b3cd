"""Memory model of one training process: what autograd keeps for one micro-batch, and the log-prob head.

    shape = MicroBatch(seqs=16, prompts=2, prompt_len=256, completion_len=512)
    acts = activation_bytes(arch, shape, dtype_bytes=2, lora_targets=LORA_MODULES, lora_r=16)
    head = head_bytes(shape, arch, dtype_bytes=2, temperature=0.7, chunk_rows=None)
    gen = generate_bytes(arch, seqs=64, prompt_len=256, new_tokens=512, dtype_bytes=2, targets=LORA_MODULES)

The terms follow the ops of a transformers Llama/Qwen2 decoder layer with frozen base weights and PEFT LoRA
(``rl_small.logprobs.shared_prefix_forward``: the prompts once, the completions on the prompts' KV cache).
A frozen linear saves nothing for backward (its weight needs no gradient, and the input gradient needs only
the weight); what is kept is:
- each RMSNorm's fp32 input (the norm upcasts; 4 bytes x hidden per token);
- each LoRA module's fp32 input (PEFT keeps adapters in fp32 and casts the input to them, one copy per
  module; in fp32 models the modules that read the same tensor share it), its dropout mask and output when
  dropout > 0, and the rank-r intermediate;
- SiLU's input and the two operands of the gate * up product (model dtype);
- scaled_dot_product_attention's query, output and log-sum-exp, and its key / value over the key length
  (prompt + completion), repeated to every query head because transformers repeats the KV heads whenever
  an attention mask is passed (the completion pass always has one);
- the final norm's fp32 input, then the head.
Gradient checkpointing keeps only each layer's input (plus the prompt KV cache the completions read) and
recomputes one layer at a time in the backward pass.

The ``hf`` backend's ``generate`` (no grad) needs, above the weights, the KV cache and the widest transient of
its prefill, one layer over every prompt token of the generation batch at once (``generate_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from rl_small.archs import Arch

FP32 = 4


@dataclass(frozen=True)
class MicroBatch:
    """One forward/backward: ``seqs`` completions of ``prompts`` distinct prompts (whole groups)."""

    seqs: int
    prompts: int
    prompt_len: int
    completion_len: int


def _lora_input_bytes(arch: Arch, dtype_bytes: int, targets: tuple[str, ...], dropout: bool) -> dict[str, int]:
    """Bytes per token kept for the LoRA branches of one layer, by the tensor they read (see module doc)."""
    dims = arch.module_dims()
    reads = {"q_proj": "norm1", "k_proj": "norm1", "v_proj": "norm1", "o_proj": "attn",
             "gate_proj": "norm2", "up_proj": "norm2", "down_proj": "act"}
    out: dict[str, int] = {}
    for m in targets:
        width = dims[m][0]
        if dropout:  # dropout saves its bool mask, lora_A saves the dropout output (fp32): per module
            out[m] = (FP32 + 1) * width
        elif dtype_bytes != FP32:  # one fp32 cast per module
            out[m] = FP32 * width
        else:  # the model's own tensor, shared by the modules that read it
            out[reads[m]] = FP32 * width
    return out


def layer_token_bytes(arch: Arch, dtype_bytes: int, targets: tuple[str, ...], lora_r: int, dropout: bool,
                      first: bool = False) -> int:
    """Bytes kept per token by one decoder layer, except attention's key/value (they scale with key length).
    ``first``: layer 0, whose input (the frozen embedding) needs no gradient, so its first norm keeps nothing."""
    h, s = arch.hidden, dtype_bytes
    norms = FP32 * h * (1 if first else 2)
    lora = sum(_lora_input_bytes(arch, s, targets, dropout).values()) + FP32 * lora_r * len(targets)
    attn = 2 * s * arch.q_dim + FP32 * arch.heads  # query, output, log-sum-exp
    mlp = 3 * s * arch.intermediate  # silu input, silu output, up output
    return norms + lora + attn + mlp


def kv_bytes_per_key(arch: Arch, dtype_bytes: int) -> int:
    """Key + value kept by SDPA per key position and layer (repeated to every query head)."""
    return 2 * dtype_bytes * arch.q_dim


def cache_bytes_per_token(arch: Arch, dtype_bytes: int) -> int:
    """A KV cache entry (key + value, KV heads only) per token and layer."""
    return 2 * dtype_bytes * arch.kv_dim


def activation_bytes(arch: Arch, mb: MicroBatch, dtype_bytes: int, targets: tuple[str, ...], lora_r: int,
                     dropout: bool = False, checkpointing: bool = False, head_transient: int = 0) -> int:
    """Peak bytes kept by autograd for one micro-batch forward, excluding the LM head (``head_bytes``).

    With checkpointing, one layer is recomputed during the backward pass, after the fused head's per-chunk
    buffers (``head_transient`` bytes, counted in ``head_bytes``) are gone, so only what it needs beyond them
    is added (measured: counting both overestimated the peak 1.4-1.6x)."""
    s, L = dtype_bytes, arch.layers
    p_tok, c_tok = mb.prompts * mb.prompt_len, mb.seqs * mb.completion_len
    prefix_cache = cache_bytes_per_token(arch, s) * L * (mb.prompts + mb.seqs) * mb.prompt_len
    masks = mb.prompts * mb.prompt_len ** 2 + mb.seqs * mb.completion_len * (mb.prompt_len + mb.completion_len)
    final_norm = FP32 * arch.hidden * (p_tok + c_tok)
    kv = kv_bytes_per_key(arch, s) * (p_tok + mb.seqs * (mb.prompt_len + mb.completion_len))
    one_layer = layer_token_bytes(arch, s, targets, lora_r, dropout) * (p_tok + c_tok) + kv
    if checkpointing:  # layer inputs + one recomputed layer (its saved tensors and about as much gradient)
        inputs = s * arch.hidden * (p_tok + c_tok) * L
        return inputs + prefix_cache + masks + final_norm + max(0, 2 * one_layer - head_transient)
    first = layer_token_bytes(arch, s, targets, lora_r, dropout, first=True) * (p_tok + c_tok) + kv
    return first + (L - 1) * one_layer + prefix_cache + masks + final_norm


def head_transient_bytes(arch: Arch, mb: MicroBatch, chunk_rows: int | None) -> int:
    """The fused head's per-chunk buffers (freed before the backward pass); 0 for the naive head."""
    return 0 if chunk_rows is None else 3 * FP32 * min(chunk_rows, mb.seqs * mb.completion_len) * arch.vocab


def head_bytes(mb: MicroBatch, arch: Arch, dtype_bytes: int, temperature: float = 1.0,
               chunk_rows: int | None = None, entropy: bool = True, grad: bool = True,
               entropy_grad: bool = False) -> int:
    """Peak bytes of the log-prob head over the micro-batch's (seqs x completion_len) positions.

    ``chunk_rows`` None, the naive head: the logits (model dtype), an fp32 copy (also after the temperature
    division), the fp32 log-softmax (kept for backward) and, for the entropy metric, exp and product, all
    (positions, vocab). ``chunk_rows`` = rows per chunk, the fused head (``rl_small.head``): hidden states go
    through the LM head ``chunk_rows`` positions at a time, so the full logits never exist; per chunk the
    fp32 logits, their log-softmax and the probabilities are alive (3 x 4 bytes x rows x V), and one fp32
    d log p / d hidden row per position (two with ``entropy_grad``) is kept for backward (``grad``).
    """
    n, v, s = mb.seqs * mb.completion_len, arch.vocab, dtype_bytes
    if chunk_rows is None:
        upcast = FP32 if (s != FP32 or temperature not in (0, 1)) else 0
        return (s + upcast + FP32 + (2 * FP32 if entropy else 0)) * n * v
    rows = min(chunk_rows, n)
    # per chunk, fp32: the scaled logits, their log-softmax and the probabilities are alive together (the
    # model-dtype logits before the cast and the gradient cast back to the model dtype are smaller); no grad:
    # the logits and the log-softmax (+ the probabilities for the entropy)
    per_chunk = 3 * FP32 * rows * v if grad or entropy else 2 * FP32 * rows * v
    kept = FP32 * arch.hidden * n * (1 + int(entropy_grad)) if grad else 0
    return per_chunk + kept + s * arch.hidden * n + 3 * FP32 * n  # + the gathered hidden rows, per-row results


def no_grad_bytes(arch: Arch, mb: MicroBatch, dtype_bytes: int, temperature: float = 1.0,
                  chunk_rows: int | None = None) -> int:
    """Peak of a no-grad log-prob pass (pi_old, pi_ref): the prompt KV cache the completions read, the widest
    transient of one layer (the MLP's gate, up and product over the completion tokens) and the head."""
    s = dtype_bytes
    prefix_cache = cache_bytes_per_token(arch, s) * arch.layers * (mb.prompts + mb.seqs) * mb.prompt_len
    c_tok = mb.seqs * mb.completion_len
    transient = 3 * s * arch.intermediate * c_tok + kv_bytes_per_key(arch, s) * mb.seqs * (
        mb.prompt_len + mb.completion_len)
    return prefix_cache + transient + head_bytes(mb, arch, s, temperature, chunk_rows, entropy=False, grad=False)


def micro_batch(micro_batch_size: int, group_size: int, prompts: int, prompt_len: int, completion_len: int,
                minibatches: int = 1) -> MicroBatch:
    """The largest micro-batch the trainer forms: chunks of about ``micro_batch_size`` that never split a
    group (``rl_small.batch.micro_batches``), within one minibatch of the step's ``prompts`` groups."""
    groups_per_minibatch = max(1, ceil(prompts / minibatches))
    groups = min(ceil(micro_batch_size / group_size), groups_per_minibatch)
    return MicroBatch(groups * group_size, groups, prompt_len, completion_len)


def prefill_token_bytes(arch: Arch, dtype_bytes: int, targets: tuple[str, ...], cpu: bool = False) -> int:
    """Widest transient of one decoder layer in a no-grad prefill, per prompt token: the MLP. A frozen linear
    holds its output (model dtype) while it runs; a LoRA one also PEFT's fp32 copy of its input (bf16 models),
    its fp32 branch output and then the scaled branch, or the scaled branch and the fp32 sum (+8 bytes per
    output); up_proj runs while act(gate) is alive, act(gate) * up holds three intermediates. Alive
    throughout (measured): the embedding output (the model's forward keeps it), the layer's input, the
    residual after attention and the normed input (hidden each), and RoPE's cos and sin (head_dim each).
    ``cpu``: the mixed-dtype add of the bf16 result and the fp32 branch also materialises the result in fp32
    on CPU (measured; CUDA casts inside the kernel). Attention is narrower (its widths are at most the hidden
    size; SDPA on GPU does not materialise the scores)."""
    h, i, s = arch.hidden, arch.intermediate, dtype_bytes
    lora_out = s + 2 * FP32 + (FP32 if cpu and s != FP32 else 0)

    def linear(module: str, width_in: int, width_out: int) -> int:
        if module not in targets:
            return s * width_out
        return lora_out * width_out + (FP32 * width_in if s != FP32 else 0)

    stream = 4 * s * h + 2 * s * arch.head_dim
    gate = stream + linear("gate_proj", h, i)
    up = stream + s * i + linear("up_proj", h, i)
    product = stream + 3 * s * i
    down = stream + s * i + linear("down_proj", i, h)
    return max(gate, up, product, down)


def generate_bytes(arch: Arch, seqs: int, prompt_len: int, new_tokens: int, dtype_bytes: int,
                   targets: tuple[str, ...], cpu: bool = False) -> int:
    """Peak bytes of one ``hf`` generate call above the weights: the larger of the prefill (the prompts' KV
    cache in every layer + ``prefill_token_bytes`` over seqs x prompt_len tokens) and the last decode step
    (the whole KV cache + the sampler's last-position logits, their fp32 copy, the tempered scores and the
    probabilities, seqs x vocab each). ``targets``: the LoRA modules, () without LoRA."""
    cache = cache_bytes_per_token(arch, dtype_bytes) * arch.layers * seqs
    prefill = cache * prompt_len + prefill_token_bytes(arch, dtype_bytes, targets, cpu) * seqs * prompt_len
    sampler = (dtype_bytes + 3 * FP32) * seqs * arch.vocab
    return max(prefill, cache * (prompt_len + new_tokens) + sampler)
