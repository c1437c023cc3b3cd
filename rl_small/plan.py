"""``rl-small plan RECIPE [--gpu NAME] [--gpus N]``: will the recipe fit, per process, before a launch?

    cfg = load_recipe("recipes/qwen2.5-1.5b/grpo/math.yaml")
    p = make_plan(cfg, gpu="l4-24gb", gpus=1)
    print(render(p)); p.fits, p.advice
    smallest_gpu(cfg)            # ("a100-40gb", Plan) or (None, Plan on the largest GPU)

The estimate per process is the sum of: base weights at model.dtype; trainable parameters (LoRA in fp32 as
PEFT keeps them) with gradients and AdamW's two moments; the larger of the training micro-batch peak
(activations + log-prob head, ``rl_small.plan_memory``) and the no-grad passes (pi_old / pi_ref / critic
values); the PPO critic (a second adapter + value head with its optimizer); generation (the vLLM share of a
colocated engine or server, or what the hf backend's generate needs above the update's peak: it runs on the
same weights between updates, never with them, so the total takes the larger of the two phases; the
gradients, freed before it, are still counted); and the CUDA context. It fits when the total is
at most 90 % of the GPU (the rest is left for allocator fragmentation and what the model does not count).
The activation and head terms are checked against measured peaks on CPU by ``bench/plan_memory.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil
from pathlib import Path

from rl_small.archs import LORA_MODULES, Arch, load_arch
from rl_small.config import RunConfig
from rl_small.plan_memory import (
    activation_bytes,
    cache_bytes_per_token,
    generate_bytes,
    head_bytes,
    head_transient_bytes,
    micro_batch,
    no_grad_bytes,
)

GiB = 2**30
# Memory as nvidia-smi reports it (MiB / 1024).
GPUS: dict[str, float] = {
    "t4-16gb": 15.0, "v100-16gb": 16.0, "a10-24gb": 22.5, "l4-24gb": 22.5, "rtx4090-24gb": 24.0,
    "v100-32gb": 32.0, "a100-40gb": 40.0, "l40s-48gb": 45.0, "a6000-48gb": 48.0, "a100-80gb": 80.0,
    "h100-80gb": 79.6, "h200-141gb": 140.4,
}
# Compute capability 7.x: no bfloat16 (vLLM refuses a bfloat16 model there; torch emulates it slowly)
NO_BF16 = frozenset({"t4-16gb", "v100-16gb", "v100-32gb"})
USABLE = 0.9
CUDA_CONTEXT_GIB = 0.5  # CUDA context + cuBLAS workspace of one process (typical, not measured here)
# Longest prompt (chat template + system prompt + question) in a micro-batch, by task; --prompt-tokens overrides.
PROMPT_TOKENS = {"arith": 64, "gsm8k": 256, "math": 384}
DEFAULT_PROMPT_TOKENS = 512
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEAD_CHUNK_ELEMENTS = 1 << 24  # rl_small.head.CHUNK_ELEMENTS (tests/test_plan.py checks that they agree)
VLLM_BATCHED_TOKENS, VLLM_MAX_SEQS = 8192, 256  # vLLM's profiling batch (defaults of its server)


@dataclass
class Term:
    name: str
    gib: float
    note: str = ""


@dataclass
class Plan:
    gpu: str
    gpus: int
    terms: list[Term]
    vllm_need_gib: float | None  # what vLLM needs inside its share (None: no vLLM on this GPU)
    vllm_share_gib: float | None
    advice: list[str] = field(default_factory=list)
    bf16_missing: bool = False  # the recipe computes in bfloat16 and the GPU has none (NO_BF16)

    @property
    def total_gib(self) -> float:
        return sum(t.gib for t in self.terms)

    @property
    def fits(self) -> bool:
        vllm_ok = self.vllm_need_gib is None or self.vllm_need_gib <= (self.vllm_share_gib or 0)
        return self.total_gib <= USABLE * GPUS[self.gpu] and vllm_ok and not self.bf16_missing


def lora_targets(cfg: RunConfig) -> tuple[str, ...]:
    """PEFT target names of the recipe ("all-linear" = every linear of a decoder layer, not the LM head)."""
    assert cfg.model.lora is not None
    t = cfg.model.lora.targets
    names = LORA_MODULES if t == "all-linear" else tuple([t] if isinstance(t, str) else t)
    unknown = [n for n in names if n not in LORA_MODULES]
    if unknown:
        raise ValueError(f"model.lora.targets: plan knows {LORA_MODULES}, got {unknown}")
    return names


def _trainable_params(arch: Arch, cfg: RunConfig) -> int:
    if cfg.model.lora is None:
        return arch.params()
    dims = arch.module_dims()
    return cfg.model.lora.r * sum(dims[m][0] + dims[m][1] for m in lora_targets(cfg)) * arch.layers


def head_rows(vocab: int, head: str = "auto") -> int | None:
    """Rows per chunk of the fused log-prob head, or None for the naive head (full fp32 logits, rl-small before
    the fused head; kept for comparison). ``auto``: the head the trainer uses, the fused ``rl_small.head``."""
    if head not in ("auto", "naive", "chunked"):
        raise ValueError(f"head must be auto, naive or chunked, got {head!r}")
    if head == "naive":
        return None
    return max(1, HEAD_CHUNK_ELEMENTS // vocab)


def colocated_vllm(cfg: RunConfig, rank: int) -> bool:
    """Does this rank's GPU also hold vLLM? ``vllm_engine``: every process; ``auto`` / ``vllm_server`` with
    ``spawn`` (auto spawns when no server_urls): rank 0 starts the servers beside its own training (README,
    "Multi-GPU and clusters"); ``vllm_server`` with ``server_urls`` or ``hf``: no."""
    r = cfg.rollout
    if r.backend == "vllm_engine":
        return True
    if r.backend == "auto" or (r.backend == "vllm_server" and r.spawn):
        return rank == 0 and not r.server_urls
    return False


def vllm_need(cfg: RunConfig, arch: Arch, prompt_len: int, gpus: int) -> tuple[float, str]:
    """GiB vLLM needs inside its share: weights, runtime (profiling batch, sampler, CUDA graphs) and the KV
    cache of every sequence it is sent at once (G x prompts_per_step per process) at max_model_len."""
    r = cfg.rollout
    s = DTYPE_BYTES.get(r.vllm_dtype, 2)  # auto = the checkpoint's dtype (bf16 for the shipped models)
    seqs = r.group_size * r.prompts_per_step * (1 if r.backend == "vllm_engine" else gpus)
    kv = cache_bytes_per_token(arch, s) * arch.layers * seqs * r.max_model_len
    runtime = (VLLM_BATCHED_TOKENS * (4 * arch.hidden + 2 * arch.intermediate) * s
               + 2 * VLLM_MAX_SEQS * arch.vocab * 4 + (0 if r.enforce_eager else GiB // 2))
    lora = 0 if cfg.model.lora is None else r.keep_versions * _trainable_params(arch, cfg) * s
    need = (arch.params() * s + runtime + lora + kv) / GiB
    return need, f"weights + runtime + KV for {seqs} seqs x {r.max_model_len} tokens ({kv / GiB:.1f} GiB)"


def make_plan(cfg: RunConfig, gpu: str = "h100-80gb", gpus: int = 1, prompt_tokens: int | None = None,
              head: str = "auto", rank: int = 0, advice: bool = True) -> Plan:
    """The estimate for process ``rank`` of ``gpus`` on ``gpu`` (rank 0 carries a colocated vLLM)."""
    if gpu not in GPUS:
        raise ValueError(f"--gpu {gpu!r}: known GPUs are {', '.join(GPUS)}")
    arch, m, a, r = load_arch(cfg.model.name), cfg.model, cfg.algo, cfg.rollout
    s = DTYPE_BYTES[m.dtype]
    lp = prompt_tokens or PROMPT_TOKENS.get(cfg.data.task, DEFAULT_PROMPT_TOKENS)
    mb = micro_batch(a.micro_batch_size, r.group_size, r.prompts_per_step, lp, r.max_new_tokens, a.minibatches)
    temp = r.temperature or 1.0
    head_chunk = head_rows(arch.vocab, head)
    n_train = _trainable_params(arch, cfg)
    targets = lora_targets(cfg) if m.lora else LORA_MODULES
    rank_r, drop = (m.lora.r, m.lora.dropout > 0) if m.lora else (0, False)
    transient = head_transient_bytes(arch, mb, head_chunk)
    acts = {ck: activation_bytes(arch, mb, s, targets, rank_r, drop, ck, transient) / GiB for ck in (False, True)}
    head_gib = head_bytes(mb, arch, s, temp, head_chunk) / GiB
    train_peak = acts[m.gradient_checkpointing] + head_gib
    shape = f"{mb.seqs} seqs x ({lp} prompt + {mb.completion_len} new tokens)"
    terms = [Term("base weights", arch.params() * s / GiB, f"{arch.params() / 1e9:.2f}B params in {m.dtype}")]
    per_param = 16 if m.lora else 3 * s  # LoRA: fp32 param + grad + 2 moments; full: grad + 2 moments (+weights)
    terms.append(Term("trainable + grads + AdamW", n_train * per_param / GiB,
                      f"{n_train / 1e6:.1f}M {'LoRA' if m.lora else 'full'} params"))
    terms.append(Term("activations", acts[m.gradient_checkpointing],
                      f"{shape}; checkpointing on {acts[True]:.2f} / off {acts[False]:.2f} GiB"))
    terms.append(Term("log-prob head", head_gib, f"{'naive, full fp32' if head_chunk is None else f'fused, chunks of {head_chunk} rows'}, "
                      f"vocab {arch.vocab}"))
    update = train_peak  # the update's peak above weights and optimizer state, as the terms below count it
    need_ref = a.kl_coef > 0 or a.log_kl
    need_old = a.epochs > 1 or a.minibatches > 1 or (a.kl_coef > 0 and a.kl_mode == "reward")
    if need_ref or need_old or a.name == "ppo":
        nog = no_grad_bytes(arch, mb, s, temp, head_chunk) / GiB
        passes = [n for n, on in (("pi_old", need_old), ("pi_ref", need_ref), ("values", a.name == "ppo")) if on]
        terms.append(Term("no-grad passes (not at once)", max(0.0, nog - train_peak),
                          f"{'/'.join(passes)} peak {nog:.2f} GiB, counted above the update's"))
        update += terms[-1].gib
    if a.name == "ppo":
        critic_state = (n_train * 16 + (arch.hidden + 1) * 16) / GiB
        critic_acts = acts[m.gradient_checkpointing] + mb.seqs * mb.completion_len * arch.hidden * 4 / GiB
        terms.append(Term("PPO critic", critic_state + max(0.0, critic_acts - train_peak),
                          f"2nd adapter + value head + AdamW; activations {critic_acts:.2f} GiB after the policy's"))
        update += max(0.0, critic_acts - train_peak)
    need = share = None
    if colocated_vllm(cfg, rank):
        share = r.gpu_memory_utilization * GPUS[gpu] * (r.num_servers if r.backend != "vllm_engine" else 1)
        need, note = vllm_need(cfg, arch, lp, gpus)
        terms.append(Term("vLLM share", share, f"gpu_memory_utilization {r.gpu_memory_utilization}; needs "
                          f"{need:.1f} GiB: {note}"))
    elif r.backend == "hf":
        seqs = min(r.generation_batch_size, r.group_size * r.prompts_per_step)
        gen = generate_bytes(arch, seqs, lp, r.max_new_tokens, s, targets if m.lora else ()) / GiB
        terms.append(Term("hf generate (not at once)", max(0.0, gen - update),
                          f"{seqs} seqs x ({lp} + {r.max_new_tokens}): KV cache + prefill peak "
                          f"{gen:.2f} GiB, counted above the update's {update:.2f}"))
    terms.append(Term("CUDA context", CUDA_CONTEXT_GIB, "typical"))
    bf16 = m.dtype == "bfloat16" or (share is not None and r.vllm_dtype == "bfloat16")
    plan = Plan(gpu, gpus, terms, need, share, bf16_missing=bf16 and gpu in NO_BF16)
    if advice:
        plan.advice = advise(cfg, plan, gpus, prompt_tokens, head, rank)
    return plan


def _fits(cfg: RunConfig, overrides: dict[str, object], **kw: object) -> bool:
    trial = cfg.model_copy(deep=True)
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        setattr(getattr(trial, section), key, value)
    return make_plan(trial, **kw).fits  # type: ignore[arg-type]


def advise(cfg: RunConfig, plan: Plan, gpus: int, prompt_tokens: int | None, head: str, rank: int) -> list[str]:
    """The first setting (in this order) that makes the plan fit, when it does not."""
    if plan.fits:
        return []
    kw = dict(gpu=plan.gpu, gpus=gpus, prompt_tokens=prompt_tokens, head=head, rank=rank, advice=False)
    if plan.bf16_missing:
        return [f"{plan.gpu} has no bfloat16 (compute capability 7.x): use a GPU that has it, or set "
                "model.dtype=float16 and rollout.vllm_dtype=float16 (untested here)"] + _bigger(cfg, **kw)
    if plan.vllm_need_gib is not None and plan.vllm_need_gib > (plan.vllm_share_gib or 0):
        util = ceil(100 * plan.vllm_need_gib / GPUS[plan.gpu]) / 100
        if util <= 0.95 and _fits(cfg, {"rollout.gpu_memory_utilization": util}, **kw):
            return [f"raise rollout.gpu_memory_utilization to {util}"]
    if not cfg.model.gradient_checkpointing and _fits(cfg, {"model.gradient_checkpointing": True}, **kw):
        return ["set model.gradient_checkpointing=true"]
    mbs, g = cfg.algo.micro_batch_size, cfg.rollout.group_size
    for smaller in range(min(mbs, ceil(mbs / g) * g) - 1, 0, -1):
        if ceil(smaller / g) < ceil(mbs / g) and _fits(cfg, {"algo.micro_batch_size": smaller}, **kw):
            return [f"lower algo.micro_batch_size to {smaller}"]
    if plan.vllm_need_gib is not None:
        util = ceil(100 * plan.vllm_need_gib / GPUS[plan.gpu]) / 100
        if util < cfg.rollout.gpu_memory_utilization and _fits(cfg, {"rollout.gpu_memory_utilization": util}, **kw):
            return [f"lower rollout.gpu_memory_utilization to {util}"]
        return ["serve vLLM from other GPUs (rollout.backend=vllm_server, rollout.server_urls=[...]) or use a "
                "larger GPU"] + _bigger(cfg, **kw)
    return _bigger(cfg, **kw)


def _bigger(cfg: RunConfig, **kw: object) -> list[str]:
    for name in sorted(GPUS, key=GPUS.__getitem__):
        if GPUS[name] > GPUS[str(kw["gpu"])] and make_plan(cfg, **{**kw, "gpu": name}).fits:  # type: ignore[arg-type]
            return [f"use a GPU with >= {GPUS[name]:.0f} GiB ({name})"]
    return ["no listed GPU holds it: lower algo.micro_batch_size / rollout.max_new_tokens"]


def smallest_gpu(cfg: RunConfig, gpus: int = 1, **kw: object) -> tuple[str | None, Plan]:
    """The smallest listed GPU the recipe fits on (every rank), and its plan for rank 0."""
    for name in sorted(GPUS, key=GPUS.__getitem__):
        plans = [make_plan(cfg, gpu=name, gpus=gpus, rank=k, advice=False, **kw)  # type: ignore[arg-type]
                 for k in range(min(gpus, 2))]
        if all(p.fits for p in plans):
            return name, plans[0]
    return None, make_plan(cfg, gpu="h200-141gb", gpus=gpus, advice=False, **kw)  # type: ignore[arg-type]


def header_line(cfg: RunConfig, **kw: object) -> str:
    """The ``# plan: ...`` line each recipe carries (tests check it against this function)."""
    name, p = smallest_gpu(cfg, **kw)
    if name is None:
        return f"# plan: fits no listed GPU (1 GPU, {p.total_gib:.1f} GiB/process on h200-141gb)"
    return f"# plan: fits {name} (1 GPU, {p.total_gib:.1f} GiB/process)"


def write_header(path: str | Path, line: str) -> bool:
    """Put ``line`` as the recipe's ``# plan:`` line (replacing the old one, else ending the leading comment
    block); True when the file changed."""
    p = Path(path)
    lines = p.read_text().splitlines(keepends=True)
    old = [i for i, x in enumerate(lines) if x.startswith("# plan:")]
    if old:
        if lines[old[0]] == line + "\n":
            return False
        lines[old[0]] = line + "\n"
    else:
        end = next((i for i, x in enumerate(lines) if not x.startswith("#")), len(lines))
        lines.insert(end, line + "\n")
    p.write_text("".join(lines))
    return True


def render(plan: Plan, title: str = "") -> str:
    """The plan as a text table with the verdict."""
    gpu_gib = GPUS[plan.gpu]
    lines = [f"{title}per process on {plan.gpu} ({gpu_gib:.1f} GiB), {plan.gpus} GPU(s):"]
    lines += [f"  {t.name:<30}{t.gib:>8.2f} GiB  {t.note}" for t in plan.terms]
    lines.append(f"  {'total':<30}{plan.total_gib:>8.2f} GiB  of {USABLE * gpu_gib:.1f} usable ({USABLE:.0%})")
    if plan.fits:
        lines.append(f"verdict: fits ({USABLE * gpu_gib - plan.total_gib:.1f} GiB to spare)")
    else:
        lines.append("verdict: does NOT fit; " + "; ".join(plan.advice))
    return "\n".join(lines)
