"""Benchmark: peak memory and time of the log-prob head, the old full-logits head against the chunked one.

    python bench/logprob_memory.py [--reps 3] [--long-tokens 1792] [--shapes default long]

The head is everything between the decoder's last hidden states (N, H) and log pi(target) (N,) plus the
entropy metric, forward and backward (gradient to the hidden states; the LM head is frozen, as under LoRA):

  old   what rl-small did before: the model's LM head makes (N, V) logits in the model dtype, then
        ``.float()``, ``/ T``, ``log_softmax`` over all of them, gather, and the (detached) entropy
  new   ``rl_small.head.lm_head_logprobs``: the LM head projected chunk by chunk, the gradient vectors
        formed in the forward pass (no (N, V) tensor alive; entropy computed, as on a logging step)

Shapes: ``default`` = the default run (SmolLM2-135M: V 49,152, H 576, fp32; a micro-batch of 16 sequences
x 48 tokens, N = 768); ``long`` = R1-Distill-Qwen-1.5B (V 151,936, H 1,536, bf16) with ``--long-tokens``
rows (the recipe's micro-batch is 4 x 3,584 = 14,336; the default 1,792 is 1/8 of it, what this loaded
2-core CPU computes in about a minute per run; the old head's memory grows linearly in N, the new one's
does not). Each run is a fresh process: peak memory = the process's peak RSS (``ru_maxrss``) minus its RSS
once the inputs (hidden states, LM head weight, targets) exist and a 2-row warm-up has run, so it is the
head's own working memory.
Old and new runs alternate. Prints a table and writes bench/results/logprob_memory.json (with ``--shapes``
naming one shape: logprob_memory_<shape>.json).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import fmt, run_worker, save_results, spread

SHAPES: dict[str, dict[str, Any]] = {
    "default": {"vocab": 49152, "hidden": 576, "dtype": "float32", "rows": 16 * 48, "temperature": 0.7},
    "long": {"vocab": 151936, "hidden": 1536, "dtype": "bfloat16", "rows": 1792, "temperature": 0.7},
}
GIB = 1 << 30


def _rss() -> int:
    """Current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _old_head(h: Any, w: Any, t: Any, temp: float) -> tuple[Any, Any]:
    """The pre-chunking head: full logits, one fp32 log-softmax, gather, detached entropy."""
    import torch

    logits = torch.nn.functional.linear(h, w).float() / temp
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = torch.gather(logp_all, -1, t.unsqueeze(-1)).squeeze(-1)
    src = logp_all.detach()
    return logp, -(src.exp() * src).sum(-1)


def _new_head(h: Any, w: Any, t: Any, temp: float) -> tuple[Any, Any]:
    from rl_small.head import lm_head_logprobs

    return lm_head_logprobs(h, w, None, t, temp, entropy=True, entropy_grad=False)


def worker(impl: str, shape: dict[str, Any], timed: int) -> dict[str, Any]:
    """One head (forward + backward) for memory, then ``timed`` more for time; in this fresh process."""
    import torch

    dtype = getattr(torch, shape["dtype"])
    n, hdim, v = shape["rows"], shape["hidden"], shape["vocab"]
    g = torch.Generator().manual_seed(0)
    w = torch.empty(v, hdim, dtype=dtype).normal_(0, hdim**-0.5, generator=g)  # in place: no temporaries
    h = torch.empty(n, hdim, dtype=dtype).normal_(0, 1, generator=g).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    c = torch.empty(n).normal_(generator=g)  # upstream gradient of the per-token logprobs (advantages)
    head = _old_head if impl == "old" else _new_head
    logp, _ = head(h[:2], w, t[:2], shape["temperature"])  # warm-up: library workspaces, thread pools
    logp.sum().backward()
    h.grad = None
    before = _rss()
    seconds = []
    for i in range(1 + timed):
        t0 = time.perf_counter()
        logp, ent = head(h, w, t, shape["temperature"])
        (logp * c).sum().backward()
        seconds.append(time.perf_counter() - t0)
        if i == 0:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            checksum = [float(logp.sum()), float(ent.sum()), float(h.grad.float().abs().sum())]
        h.grad = None
        del logp, ent
    return {"peak_gib": (peak - before) / GIB, "inputs_gib": before / GIB, "first_s": seconds[0],
            "seconds": seconds[1:] or seconds, "checksum": checksum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per head and shape")
    ap.add_argument("--long-tokens", type=int, default=SHAPES["long"]["rows"], help="rows N of the long shape")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--worker", choices=("old", "new"), help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    SHAPES["long"]["rows"] = args.long_tokens
    if args.worker:
        timed = 3 if args.shape == "default" else 0
        Path(args.out).write_text(json.dumps(worker(args.worker, SHAPES[args.shape], timed)))
        return
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {"old": [], "new": []} for s in args.shapes}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            for rep in range(args.reps):
                for impl in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                    out = Path(tmp) / f"{shape}-{impl}-{rep}.json"
                    wargs = ["--worker", impl, "--shape", shape, "--long-tokens", str(args.long_tokens)]
                    runs[shape][impl].append(run_worker(sys.executable, Path(__file__), wargs, out, 3600))
                    r = runs[shape][impl][-1]
                    print(f"  {shape} {impl} rep {rep}: peak {r['peak_gib']:.3f} GiB, {r['first_s']:.2f} s", flush=True)
    rows, table = [], []
    for shape in args.shapes:
        s = {impl: {"peak_gib": spread([r["peak_gib"] for r in rs]),
                    "seconds": spread([x for r in rs for x in r["seconds"]])} for impl, rs in runs[shape].items()}
        same = all(abs(a - b) <= 1e-2 * max(1.0, abs(a)) for a, b in
                   zip(runs[shape]["old"][0]["checksum"], runs[shape]["new"][0]["checksum"]))
        mem_x = s["old"]["peak_gib"]["mean"] / max(s["new"]["peak_gib"]["mean"], 1e-9)
        time_x = s["old"]["seconds"]["mean"] / s["new"]["seconds"]["mean"]
        rows.append({"shape": shape, **SHAPES[shape], **s, "memory_ratio": mem_x, "speedup": time_x,
                     "checksums_agree": same, "runs": runs[shape]})
        table.append(f"| {shape} (N={SHAPES[shape]['rows']}, V={SHAPES[shape]['vocab']}, {SHAPES[shape]['dtype']}) "
                     f"| {fmt(s['old']['peak_gib'], 3)} | {fmt(s['new']['peak_gib'], 3)} | {mem_x:.1f}x "
                     f"| {fmt(s['old']['seconds'], 2)} | {fmt(s['new']['seconds'], 2)} | {time_x:.2f}x | {same} |")
    print("| shape | old peak GiB | new peak GiB | less memory | old s | new s | speedup | same values |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(table))
    name = "logprob_memory" if set(args.shapes) == set(SHAPES) else "logprob_memory_" + "_".join(args.shapes)
    print(f"wrote {save_results(name, {'reps': args.reps, 'results': rows})}")


if __name__ == "__main__":
    main()
