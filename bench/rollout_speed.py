"""Benchmark: rollout-stage throughput of the generation backends and the cost of a weight sync.

    python bench/rollout_speed.py [--prompts 16] [--n 8] [--max-new-tokens 128] [--reps 2] [--e2e-steps 3]

On SmolLM2-135M-Instruct (fp32) with one trained-size LoRA adapter (r=16, all linear layers) loaded, the
same prompts (GSM8K test questions, or arith problems without the local data of ``rl-small data download``) and the same sampling
(n completions, T=1.0, top-p 1.0, max_new_tokens) go through, in one process run on one machine:

  raw vllm       ``LLM.generate`` called directly (the reference)
  vllm_engine    rl_small's in-process backend on that same engine (token ids in, Rollouts out)
  vllm_server    rl_small's HTTP client against a spawned ``vllm serve`` with the adapter hot-loaded
  hf             transformers ``generate`` on the PEFT model (rl_small's debugging backend)

Throughput = completion tokens / wall seconds of the whole ``generate`` call (best of --reps after one
warm-up). Sync = export the adapter + load it as a new version (server: /v1/load_lora_adapter; engine:
add_lora) against the full-weight path (merge the adapter, save the model, restart the server / rebuild the
engine on it until it serves). With --e2e-steps, the default training run is also timed per step with the
``--e2e-backends`` (default ``hf`` and ``vllm_server``, spawned; ``vllm_server:merged`` for rollout.sync merged,
``vllm_server:merged:async`` with rollout.async_generation as well;
``--e2e-only`` skips the rest and writes bench/results/rollout_speed_e2e.json). Prints a table and writes bench/results/rollout_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import data_root, noisy_lora_policy

from rl_small import metric_names as M

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = data_root()  # rl-small data download --out data (or $RL_SMALL_DATA)


def _prompts(tok: Any, k: int) -> list[Any]:
    from rl_small.config import DataConfig
    from rl_small.data import build_prompts, load_task_rows

    if (SHARED / "gsm8k").exists():
        cfg = DataConfig(task="gsm8k", path=str(SHARED / "gsm8k"), template="boxed", eval_split="test")
        rows, _ = load_task_rows(cfg, "test", limit=k)
    else:
        cfg = DataConfig(task="arith")
        rows, _ = load_task_rows(cfg, "eval", limit=k)
    return build_prompts(rows, tok, cfg)


def _time_generate(fn: Any, reps: int) -> tuple[float, int, list[float]]:
    fn()  # warm-up
    walls, tokens = [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        tokens = fn()
        walls.append(time.perf_counter() - t0)
    return min(walls), tokens, walls


def _time_syncs(backend: Any, peft_model: Any, reps: int) -> list[float]:
    """Seconds of ``reps`` adapter syncs (export + load as versions 2, 3, ...)."""
    out = []
    for v in range(2, 2 + reps):
        t0 = time.perf_counter()
        backend.sync(peft_model, version=v)
        out.append(time.perf_counter() - t0)
    return out


def _full_weights(peft_model: Any, tok: Any, out: Path) -> Path:
    """The full-weight path's export: merge the adapter into a copy of the base and save it (+ tokenizer)."""
    import copy

    m = copy.deepcopy(peft_model).merge_and_unload()
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def bench_engine(model_dir: str, tok: Any, peft_model: Any, adapter: Path, prompts: list[Any], args: Any,
                 work: Path) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from rl_small.rollout.base import SamplingSpec
    from rl_small.rollout.vllm_engine import VLLMEngineBackend

    spec = SamplingSpec(args.n, args.max_new_tokens, 1.0, 1.0)
    backend = VLLMEngineBackend(model_dir, tok, work / "engine", lora_rank=16, keep_versions=2,
                                max_model_len=1024, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    res: dict[str, Any] = {}
    try:
        backend.sync(adapter, version=1)
        ids = [tok(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
        lora = LoRARequest("raw", 999, str(adapter))
        params = SamplingParams(n=args.n, max_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, logprobs=0)

        def raw() -> int:
            outs = backend.llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, lora_request=lora,
                                        use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)

        def ours() -> int:
            return sum(len(r.completion_ids) for r in backend.generate(prompts, spec))

        res["raw_vllm"] = _time_generate(raw, args.reps)
        res["vllm_engine"] = _time_generate(ours, args.reps)
        res["engine_adapter_sync"] = _time_syncs(backend, peft_model, args.reps)
        t0 = time.perf_counter()
        full = _full_weights(peft_model, tok, work / "engine-full")
        backend.lora_rank = None
        del backend.llm
        backend.llm = backend._build(str(full))
        backend.llm.generate([TokensPrompt(prompt_token_ids=ids[0])], SamplingParams(max_tokens=1), use_tqdm=False)
        res["engine_full_sync"] = [time.perf_counter() - t0]
    finally:
        backend.close()
    return res


def bench_server(model_dir: str, tok: Any, peft_model: Any, prompts: list[Any], args: Any, work: Path) -> dict[str, Any]:
    from rl_small.config import RolloutConfig
    from rl_small.rollout.base import SamplingSpec
    from rl_small.rollout.server import healthy
    from rl_small.rollout.vllm_server import VLLMServerBackend

    spec = SamplingSpec(args.n, args.max_new_tokens, 1.0, 1.0)
    cfg = RolloutConfig(backend="vllm_server", spawn=True, port=args.port, max_model_len=1024, keep_versions=2)
    t0 = time.perf_counter()
    backend = VLLMServerBackend.from_config(cfg, tok, model_name=model_dir, lora_rank=16, run_dir=work / "server")
    res: dict[str, Any] = {"server_start_s": time.perf_counter() - t0}
    try:
        backend.sync(peft_model, version=1)
        res["vllm_server"] = _time_generate(lambda: sum(len(r.completion_ids) for r in backend.generate(prompts, spec)),
                                            args.reps)
        res["server_adapter_sync"] = _time_syncs(backend, peft_model, args.reps)
        t0 = time.perf_counter()
        full = _full_weights(peft_model, tok, work / "server-full")
        server = next(iter(backend.servers.values()))
        server.model, server.lora_rank = str(full), 0
        server.restart()
        assert healthy(server.url)
        res["server_full_sync"] = [time.perf_counter() - t0]
    finally:
        backend.close()
    return res


def bench_hf(peft_model: Any, tok: Any, prompts: list[Any], args: Any) -> dict[str, Any]:
    from rl_small.rollout.base import SamplingSpec
    from rl_small.rollout.hf import HFBackend

    backend = HFBackend(peft_model, tok, batch_size=64)
    spec = SamplingSpec(args.n, args.max_new_tokens, 1.0, 1.0)
    return {"hf": _time_generate(lambda: sum(len(r.completion_ids) for r in backend.generate(prompts, spec)),
                                 max(1, args.reps - 1))}


def bench_e2e(args: Any, work: Path) -> dict[str, Any]:
    """Seconds per training step of the default run (no evaluation) with hf and with a spawned vllm_server."""
    from rl_small.config import load_recipe
    from rl_small.trainer import Trainer

    out: dict[str, Any] = {}
    for spec in args.e2e_backends:  # backend[:rollout.sync[:async]]
        backend, _, rest = spec.partition(":")
        mode, _, flag = rest.partition(":")
        if flag not in ("", "async") or (flag and backend != "vllm_server"):
            raise SystemExit(f"--e2e-backends {spec!r}: the third field is 'async' (vllm_server only)")
        over = [f"rollout.backend={backend}", f"train.steps={args.e2e_steps}", "train.progress=false",
                "train.trackers=[]"]
        if backend != "hf":  # options of another backend are an error at load
            over += [f"rollout.sync={mode or 'adapter'}", "rollout.max_model_len=1024"]
        if flag:  # the next step's rollouts generated during this step's update
            over += ["rollout.async_generation=true"]
        if backend == "vllm_server":
            over += ["rollout.spawn=true", f"rollout.port={args.port + 10}"]
        key = spec if spec not in out else f"{spec}#{sum(k.split('#')[0] == spec for k in out) + 1}"  # rounds
        tr = Trainer(load_recipe(None, over), work / f"e2e-{key.replace(':', '-').replace('#', '-')}")
        try:
            steps = [tr.step() for _ in range(args.e2e_steps)]
        finally:
            tr.backend.close()
        out[key] = {k: [s[k] for s in steps] for k in (M.TIME_STEP, M.TIME_ROLLOUT, M.TIME_UPDATE, M.TIME_SYNC)
                    if k in steps[0]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--port", type=int, default=8231)
    ap.add_argument("--e2e-steps", type=int, default=0, help="also time N default-run training steps per backend")
    ap.add_argument("--e2e-backends", nargs="+", default=["hf", "vllm_server"],
                    help="--e2e-steps: backends to time, backend[:rollout.sync[:async]], e.g. vllm_server:merged:async")
    ap.add_argument("--e2e-only", action="store_true", help="only the --e2e-steps training steps")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from rl_small.models import load_tokenizer, resolve_model

    model_dir = resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(model_dir)
    prompts = _prompts(tok, args.prompts)
    work = Path(tempfile.mkdtemp(prefix="rollout_bench_"))
    peft_model = noisy_lora_policy(model_dir, work / "adapter")
    results: dict[str, Any] = {}
    if args.e2e_only:
        results["e2e"] = bench_e2e(args, work)
        print(json.dumps(results["e2e"], indent=1))
        (RESULTS / "rollout_speed_e2e.json").write_text(json.dumps({"settings": vars(args), **results}, indent=2))
        return
    results.update(bench_engine(model_dir, tok, peft_model, work / "adapter", prompts, args, work))
    results.update(bench_server(model_dir, tok, peft_model, prompts, args, work))
    if not args.skip_hf:
        results.update(bench_hf(peft_model, tok, prompts, args))
    if args.e2e_steps:
        results["e2e"] = bench_e2e(args, work)
    shutil.rmtree(work, ignore_errors=True)
    report(results, args)


def report(results: dict[str, Any], args: Any) -> None:
    raw_wall, raw_tok, _ = results["raw_vllm"]
    rows = []
    print(f"\nRollout stage: {args.prompts} prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, T=1.0, "
          f"SmolLM2-135M fp32 + LoRA r=16 (best of {args.reps})")
    print(f"{'backend':<14}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'x raw vLLM wall':>17}")
    for name in ("raw_vllm", "vllm_engine", "vllm_server", "hf"):
        if name not in results:
            continue
        wall, tokens, walls = results[name]
        # tokens differ slightly between backends (sampling); compare time per token
        rel = (wall / tokens) / (raw_wall / raw_tok)
        rows.append({"backend": name, "tokens": tokens, "wall_s": wall, "walls_s": walls, "tok_per_s": tokens / wall,
                     "time_per_token_vs_raw": rel})
        print(f"{name:<14}{tokens:>8}{wall:>9.2f}{tokens / wall:>9.1f}{rel:>17.2f}")
    sync = {k: results[k] for k in ("engine_adapter_sync", "engine_full_sync", "server_adapter_sync",
                                    "server_full_sync") if k in results}
    print("\nWeight sync (seconds): adapter = save + load as new version; full = merge + save + reload/restart")
    print(f"{'path':<22}{'median s':>10}{'speed-up':>10}")
    for where in ("engine", "server"):
        a, f = statistics.median(sync[f"{where}_adapter_sync"]), statistics.median(sync[f"{where}_full_sync"])
        print(f"{where + ' adapter':<22}{a:>10.3f}{f / a:>9.0f}x")
        print(f"{where + ' full weights':<22}{f:>10.2f}{'':>10}")
    out: dict[str, Any] = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                           "settings": vars(args), "rollout": rows, "sync_s": sync,
                           "server_start_s": results.get("server_start_s")}
    if "e2e" in results:
        print("\nDefault run, seconds per training step (mean over steps)")
        for name, t in results["e2e"].items():
            print(f"{name:<14}" + "  ".join(f"{k.split('/')[1]} {statistics.mean(v):.2f}" for k, v in t.items()))
        out["e2e_step_s"] = results["e2e"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rollout_speed.json").write_text(json.dumps(out, indent=2))
    print(f"\nwrote {RESULTS / 'rollout_speed.json'}")


if __name__ == "__main__":
    main()
