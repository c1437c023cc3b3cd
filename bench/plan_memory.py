"""Measured vs estimated memory of one training micro-batch (activations + log-prob head), the check behind
``rl-small plan``.

    python bench/plan_memory.py            # every case; table + bench/results/plan_memory.json
    python bench/plan_memory.py --quick    # the small cases only
    python bench/plan_memory.py --plan-table   # every recipe's plan on h100-80gb, naive vs fused head

Each case builds a random model of a recipe's family (the real vocabulary and head layout, fewer layers,
sometimes a smaller hidden size) with LoRA as the recipe sets it, and runs one forward + backward of a
micro-batch (shared-prefix forward, log-probs, entropy metric, backward of the mean log-prob) in a fresh
subprocess. Peak = the process's resident high-water mark (reset through /proc/self/clear_refs after a tiny
warm-up step) minus its resident size just before the step; glibc is told to mmap every allocation above
64 KiB, so freed tensors leave the resident set at once. The estimate is ``rl_small.plan_memory``'s
activations + head (+ the LoRA gradients, allocated during the backward pass); no-grad cases compare with
``no_grad_bytes``. Generate cases run the ``hf`` backend's ``model.generate`` (eval mode, left padding,
sampling) on a batch of prompts and compare with ``generate_bytes`` (its CPU variant: CPU adds one fp32 copy
per LoRA module's mixed-dtype add); the LM head's input is made contiguous first, because a PEFT-wrapped bf16
model's head took 0.45 GiB and seconds per row on CPU on the prefill's strided last-position rows (a CPU
artefact that would swamp the measurement). The check: |estimate / measured - 1| <= 25 %.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import save_results  # noqa: E402

from rl_small.archs import LORA_MODULES, Arch  # noqa: E402
from rl_small.plan import head_rows  # noqa: E402
from rl_small.plan_memory import (  # noqa: E402
    activation_bytes,
    generate_bytes,
    head_bytes,
    head_transient_bytes,
    micro_batch,
    no_grad_bytes,
)  # noqa: E402

TOLERANCE = 0.25
SMOL = dict(family="llama", layers=2, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, tied=True)
QWEN_SMALL = dict(family="qwen2", layers=2, hidden=256, intermediate=1024, heads=4, kv_heads=2, vocab=151936,
                  tied=True)
QWEN_15B_1L = dict(family="qwen2", layers=1, hidden=1536, intermediate=8960, heads=12, kv_heads=2,
                   vocab=151936, tied=True)
QWEN_05B = dict(family="qwen2", layers=3, hidden=896, intermediate=4864, heads=14, kv_heads=2, vocab=151936,
                tied=True)
R1_SMALL = dict(family="qwen2", layers=2, hidden=384, intermediate=2240, heads=3, kv_heads=1, vocab=151936,
                tied=False)
LLAMA_SMALL = dict(family="llama", layers=2, hidden=512, intermediate=2048, heads=8, kv_heads=2, vocab=128256,
                   tied=True)
ALL = list(LORA_MODULES)

# name, model, dtype, lora (r, dropout, targets), checkpointing, micro-batch (mbs, G, prompt, completion), T, no_grad
CASES: list[dict[str, Any]] = [
    dict(name="smollm2 default fp32", model=SMOL, dtype="float32", r=16, dropout=0.0, targets=ALL, ckpt=False,
         mbs=16, G=8, Lp=64, C=48, T=0.7, quick=True),
    dict(name="smollm2 fp32 no-grad", model=SMOL, dtype="float32", r=16, dropout=0.0, targets=ALL, ckpt=False,
         mbs=16, G=8, Lp=64, C=48, T=0.7, no_grad=True, quick=True),
    dict(name="qwen2 small bf16", model=QWEN_SMALL, dtype="bfloat16", r=16, dropout=0.0, targets=ALL,
         ckpt=False, mbs=16, G=8, Lp=96, C=64, T=1.0, quick=True),
    dict(name="llama3.2 small bf16", model=LLAMA_SMALL, dtype="bfloat16", r=16, dropout=0.0, targets=ALL,
         ckpt=False, mbs=16, G=8, Lp=96, C=64, T=1.0),
    dict(name="r1-distill small bf16 ckpt drop", model=R1_SMALL, dtype="bfloat16", r=32, dropout=0.05,
         targets=ALL, ckpt=True, mbs=4, G=6, Lp=96, C=256, T=0.7),
    dict(name="r1-distill small bf16 drop", model=R1_SMALL, dtype="bfloat16", r=32, dropout=0.05,
         targets=ALL, ckpt=False, mbs=4, G=6, Lp=96, C=256, T=0.7),
    dict(name="qwen2.5-0.5B-shaped bf16", model=QWEN_05B, dtype="bfloat16", r=16, dropout=0.0, targets=ALL,
         ckpt=False, mbs=8, G=8, Lp=128, C=96, T=1.0),
    dict(name="qwen2.5-0.5B-shaped bf16 ckpt", model=QWEN_05B, dtype="bfloat16", r=16, dropout=0.0,
         targets=ALL, ckpt=True, mbs=8, G=8, Lp=128, C=96, T=1.0),
    dict(name="qwen2.5-0.5B-shaped fp32", model=QWEN_05B, dtype="float32", r=16, dropout=0.0, targets=ALL,
         ckpt=False, mbs=8, G=8, Lp=128, C=96, T=1.0),
    # hf generate: seqs prompts of Lp tokens (half of them one token shorter, left-padded), C new tokens
    dict(name="smollm2 generate bf16", model=SMOL, dtype="bfloat16", r=16, dropout=0.0, targets=ALL,
         ckpt=True, generate=True, seqs=32, Lp=96, C=8, T=0.7, quick=True),
    dict(name="smollm2 generate fp32", model=SMOL, dtype="float32", r=16, dropout=0.0, targets=ALL,
         ckpt=False, generate=True, seqs=32, Lp=96, C=8, T=1.0),
    dict(name="smollm2 generate bf16 no LoRA", model=SMOL, dtype="bfloat16", r=0, dropout=0.0, targets=[],
         ckpt=False, generate=True, seqs=32, Lp=96, C=8, T=1.0),
    dict(name="qwen2.5-1.5B generate, H200 rehearsal shape (1 layer)", model=QWEN_15B_1L, dtype="bfloat16",
         r=32, dropout=0.0, targets=ALL, ckpt=True, generate=True, seqs=64, Lp=179, C=4, T=1.0),
    dict(name="qwen2.5-0.5B generate, H200 rehearsal shape", model=QWEN_05B, dtype="bfloat16", r=32,
         dropout=0.0, targets=ALL, ckpt=True, generate=True, seqs=64, Lp=178, C=4, T=1.0),
]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def arch_of(m: dict[str, Any]) -> Arch:
    return Arch(m["layers"], m["hidden"], m["intermediate"], m["heads"], m["kv_heads"], m["hidden"] // m["heads"],
                m["vocab"], m["tied"], attention_bias=m["family"] == "qwen2")


def estimate(case: dict[str, Any]) -> int:
    """rl_small.plan_memory's bytes for the case (activations + head + LoRA gradients, or the no-grad pass)."""
    arch, s = arch_of(case["model"]), DTYPE_BYTES[case["dtype"]]
    if case.get("generate"):
        return generate_bytes(arch, case["seqs"], case["Lp"], case["C"], s, tuple(case["targets"]), cpu=True)
    mb = micro_batch(case["mbs"], case["G"], 64, case["Lp"], case["C"])
    rows = head_rows(arch.vocab)  # the head this checkout has (naive, or the fused rl_small.head)
    if case.get("no_grad"):
        return no_grad_bytes(arch, mb, s, case["T"], rows)
    dims = arch.module_dims()
    grads = 4 * case["r"] * sum(dims[t][0] + dims[t][1] for t in case["targets"]) * arch.layers
    acts = activation_bytes(arch, mb, s, tuple(case["targets"]), case["r"], case["dropout"] > 0, case["ckpt"],
                            head_transient_bytes(arch, mb, rows))
    return acts + head_bytes(mb, arch, s, case["T"], rows) + grads


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]


def worker(case: dict[str, Any]) -> dict[str, Any]:
    """Build the case's random model, run one micro-batch, return the measured peak above the baseline."""
    import gc

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from rl_small.logprobs import completion_logprobs, completion_logprobs_and_entropy
    from rl_small.types import Prompt, Rollout

    m = case["model"]
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(m["family"], vocab_size=m["vocab"], hidden_size=m["hidden"],
                               intermediate_size=m["intermediate"], num_hidden_layers=m["layers"],
                               num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"],
                               tie_word_embeddings=m["tied"], max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, case["dtype"]))
    if case["r"]:
        lora = LoraConfig(r=case["r"], lora_alpha=2 * case["r"], lora_dropout=case["dropout"],
                          target_modules=case["targets"], task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if case["ckpt"]:
        try:  # the trainer's way (non-reentrant, exact with the shared-prefix cache) once it exists
            from rl_small.models import enable_checkpointing
        except ImportError:
            model.gradient_checkpointing_enable()
        else:
            enable_checkpointing(model)
    if case.get("generate"):
        return _generate_peak(model, case)
    model.train()

    def rollouts(groups: int, lp: int, c: int) -> list[Rollout]:
        out = []
        for g in range(groups):
            prompt_ids = torch.randint(5, m["vocab"], (lp - (g % 2),)).tolist()  # unequal lengths: padding
            for _ in range(case["G"]):
                out.append(Rollout(Prompt(str(g), "0", {}), g, prompt_ids, torch.randint(5, m["vocab"], (c,)).tolist(),
                                   "", None, True, 0))
        return out

    def step(rs: list[Rollout]) -> None:
        if case.get("no_grad"):
            with torch.no_grad():
                completion_logprobs(model, rs, 0, case["T"])
            return
        logp, mask, _ = completion_logprobs_and_entropy(model, rs, 0, case["T"], entropy_grad=False)
        ((logp * mask).sum() / mask.sum()).backward()

    try:
        step(rollouts(1, 4, 3))  # warm-up: kernels, thread pools, LoRA gradient buffers
    except AttributeError as err:  # checkpointing + shared prefix before the fix of issue 15 part 1
        return {"skipped": f"{type(err).__name__}: {err}"}
    model.zero_grad(set_to_none=True)
    batch = rollouts(-(-case["mbs"] // case["G"]), case["Lp"], case["C"])
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status()["VmRSS"]
    step(batch)
    return {"peak_bytes": _status()["VmHWM"] - base, "baseline_bytes": base}


def _generate_peak(model: Any, case: dict[str, Any]) -> dict[str, Any]:
    """The hf backend's generate call (``rl_small.rollout.hf``) on ``case['seqs']`` random prompts; peak above
    the baseline, as ``worker``."""
    import gc

    import torch

    model.eval()  # as HFBackend.generate
    model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: (args[0].contiguous(),))
    vocab = case["model"]["vocab"]

    def prompts(n: int, lp: int) -> dict[str, torch.Tensor]:
        ids, mask = torch.randint(5, vocab, (n, lp)), torch.ones(n, lp, dtype=torch.long)
        ids[::2, 0], mask[::2, 0] = 0, 0  # half the rows one token shorter, left-padded
        return {"input_ids": ids, "attention_mask": mask}

    def generate(inputs: dict[str, torch.Tensor], new: int) -> None:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                           temperature=case["T"], top_p=1.0, top_k=0, pad_token_id=0)

    generate(prompts(2, 4), 2)  # warm-up
    batch = prompts(case["seqs"], case["Lp"])
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status()["VmRSS"]
    generate(batch, case["C"])
    return {"peak_bytes": _status()["VmHWM"] - base, "baseline_bytes": base}


def measure(case: dict[str, Any]) -> dict[str, Any]:
    """Run ``worker`` for the case in a fresh interpreter (one case per process)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case['name']!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        got = measure(case)
        est = estimate(case)
        if "skipped" in got:
            rows.append({"case": case["name"], "skipped": got["skipped"], "estimated_mib": est / 2**20,
                         "config": case})
            continue
        rows.append({"case": case["name"], "head": "naive" if head_rows(1) is None else "fused",
                     "measured_mib": got["peak_bytes"] / 2**20, "estimated_mib": est / 2**20,
                     "ratio": est / got["peak_bytes"], "config": case})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | micro-batch (seqs x prompt+completion) | measured MiB | estimated MiB | est/meas |",
             "|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        if "skipped" in r:
            lines.append(f"| {r['case']} | skipped: {r['skipped']} | | {r['estimated_mib']:.0f} | |")
            continue
        seqs = c["seqs"] if c.get("generate") else -(-c["mbs"] // c["G"]) * c["G"]
        lines.append(f"| {r['case']} | {seqs} x {c['Lp']}+{c['C']} | {r['measured_mib']:.0f} | "
                     f"{r['estimated_mib']:.0f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def plan_table() -> str:
    """Every recipe's plan on h100-80gb with the naive and the fused head (the table of BENCHMARKS.md)."""
    from rl_small.config import load_recipe
    from rl_small.plan import make_plan, smallest_gpu

    root = Path(__file__).resolve().parents[1] / "recipes"
    lines = ["| recipe | smallest GPU (naive head / fused head) | total on h100-80gb (naive / fused) | weights | "
             "LoRA + AdamW | activations (ckpt) | head (naive / fused) | no-grad passes extra | critic | "
             "vLLM share (needs) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(root.glob("**/*.yaml")):
        cfg = load_recipe(r)
        best = [smallest_gpu(cfg, head=h)[0] or "none" for h in ("naive", "chunked")]
        pn, pf = make_plan(cfg, head="naive"), make_plan(cfg, head="chunked")
        t, tf = {x.name: x.gib for x in pn.terms}, {x.name: x.gib for x in pf.terms}
        lines.append(
            f"| {r.relative_to(root)} | {best[0]} / {best[1]} | {pn.total_gib:.1f} / {pf.total_gib:.1f} | "
            f"{t['base weights']:.2f} | {t['trainable + grads + AdamW']:.2f} | {t['activations']:.2f} "
            f"({'on' if cfg.model.gradient_checkpointing else 'off'}) | {t['log-prob head']:.2f} / "
            f"{tf['log-prob head']:.2f} | {tf.get('no-grad passes (not at once)', 0):.2f} | "
            f"{t.get('PPO critic', 0):.2f} | {t.get('vLLM share', 0):.1f} ({pn.vllm_need_gib or 0:.1f}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="only the small cases")
    ap.add_argument("--only", help="run the cases whose name contains this")
    ap.add_argument("--plan-table", action="store_true", help="print every recipe's plan (no measurement)")
    args = ap.parse_args()
    if args.plan_table:
        sys.stdout.write(plan_table() + "\n")
        return
    if args.worker:
        sys.stdout.write(json.dumps(worker(json.loads(args.worker))) + "\n")
        return
    cases = [c for c in CASES if (c.get("quick") or not args.quick) and (not args.only or args.only in c["name"])]
    rows = run(cases)
    sys.stdout.write(table(rows) + "\n")
    bad = [r["case"] for r in rows if "ratio" in r and abs(r["ratio"] - 1) > TOLERANCE]
    if not args.only:
        save_results("plan_memory", {"tolerance": TOLERANCE, "rows": rows, "outside_tolerance": bad})
    if bad:
        sys.stdout.write(f"outside {TOLERANCE:.0%}: {bad}\n")


if __name__ == "__main__":
    main()
