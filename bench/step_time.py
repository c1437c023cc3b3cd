"""Benchmark: seconds per training step and per stage, and the shared-prefix logprob saving.

    python bench/step_time.py [--steps 3] [key=value overrides ...]

Runs ``--steps`` GRPO steps of the default run (or the overrides) without evaluation and prints a table
(mean / min / max seconds per stage), then times the update's forward+backward on the same rollouts with
the shared-prefix path (rl_small.logprobs) and with one batched full-sequence forward. Writes
``bench/results/step_time.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rl_small.config import load_recipe
from rl_small.logprobs import completion_logprobs
from rl_small.losses import token_logprobs
from rl_small.trainer import Trainer
from rl_small.types import Rollout


def full_sequence_logprobs(model, rollouts: list[Rollout], pad_id: int, temperature: float) -> torch.Tensor:  # noqa: ANN001
    """Baseline: every prompt+completion left-padded into one batch and run whole."""
    seqs = [r.prompt_ids + r.completion_ids for r in rollouts]
    width, c = max(map(len, seqs)), max(len(r.completion_ids) for r in rollouts)
    ids = torch.full((len(seqs), width), pad_id)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :], attn[i, width - len(s) :] = torch.tensor(s), 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=c + 1).logits[:, :-1]
    return token_logprobs(logits, ids[:, -c:], temperature)


def time_update(fn, model, rollouts, pad, temp, reps: int) -> list[float]:  # noqa: ANN001
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        lp = fn(model, rollouts, pad, temp)
        lp = lp[0] if isinstance(lp, tuple) else lp
        lp.sum().backward()
        model.zero_grad(set_to_none=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_recipe(None, [f"train.steps={args.steps}", "train.progress=false", "train.save_every=0",
                                 f"train.output_dir={tmp}", *args.overrides])
        tr = Trainer(cfg, Path(tmp) / "bench")
        rows, captured = [], []
        orig = tr.backend.generate
        tr.backend.generate = lambda p, s: captured.append(orig(p, s)) or captured[-1]  # keep the last batch
        for _ in range(args.steps):
            rows.append(tr.step())
        stages = sorted(k for k in rows[0] if k.startswith("timing/") and "/reward/" not in k)
        table = {k: [r[k] for r in rows] for k in stages}
        rollouts, pad, temp = captured[-1], tr.tok.pad_token_id, cfg.rollout.temperature
        shared = time_update(completion_logprobs, tr.model, rollouts, pad, temp, args.reps)
        full = time_update(full_sequence_logprobs, tr.model, rollouts, pad, temp, args.reps)
    print(f"\nstep time, {args.steps} steps, {len(rollouts)} completions/step ({platform.processor() or platform.machine()},"
          f" {torch.get_num_threads()} threads)")
    print(f"{'stage':<22}{'mean s':>10}{'min s':>10}{'max s':>10}")
    for k, v in table.items():
        print(f"{k:<22}{statistics.mean(v):>10.2f}{min(v):>10.2f}{max(v):>10.2f}")
    print(f"\nlogprobs forward+backward on one step's rollouts, {args.reps} reps")
    for name, v in (("shared prefix", shared), ("full sequences", full)):
        print(f"{name:<22}{statistics.mean(v):>10.2f}{min(v):>10.2f}{max(v):>10.2f}")
    print(f"speed-up (mean): {statistics.mean(full) / statistics.mean(shared):.2f}x")
    out = {"argv": sys.argv[1:], "stages": table, "update_shared_prefix_s": shared, "update_full_sequence_s": full,
           "completions_per_step": len(rollouts), "threads": torch.get_num_threads()}
    Path(__file__).with_name("results").mkdir(exist_ok=True)
    (Path(__file__).with_name("results") / "step_time.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
