"""``vllm_engine`` backend: vLLM in this process ("colocate"), with the same adapter-version semantics as
``vllm_server``: ``sync`` saves the adapter as ``v{version}`` and later requests name it; the oldest versions
beyond ``keep_versions`` are removed from the engine. With ``rollout.sync: merged`` (or ``auto`` choosing it,
weights.py) the adapter is merged into a copy of the base weights, which vLLM reloads in place
(``collective_rpc("reload_weights")``), and requests use no LoRA. Full weights (no LoRA) are reloaded by
rebuilding the engine on the saved folder (CPU path; an in-place GPU weight update is not built here).

vLLM starts worker processes: scripts that build this backend need the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl_small.rollout.base import SamplingSpec, expand_requests, export_weights, make_rollout
from rl_small.rollout.server import cpu_env, lora_rank_bucket, on_cpu
from rl_small.rollout.weights import WeightSync
from rl_small.types import Prompt, Rollout

if TYPE_CHECKING:
    from rl_small.config import RolloutConfig

log = logging.getLogger("rl_small.rollout")


class VLLMEngineBackend:
    """``vllm.LLM`` on the base model with LoRA enabled."""

    def __init__(self, model: str, tokenizer: Any, adapter_root: Path, lora_rank: int | None = 16,
                 keep_versions: int = 2, seed: int = 0, sync: str = "adapter", **engine_kwargs: Any) -> None:
        self.model, self.tok, self.adapter_root = model, tokenizer, Path(adapter_root)
        self.weights = WeightSync(sync, self.adapter_root)
        self.lora_rank, self.keep, self.seed = lora_rank, keep_versions, seed
        self.engine_kwargs = engine_kwargs
        self.version = 0
        self.loaded: list[int] = []
        self.paths: dict[int, Path] = {}
        self.llm = self._build(model)

    @classmethod
    def from_config(cls, cfg: RolloutConfig, tokenizer: Any, model_name: str | None = None,
                    lora_rank: int | None = None, run_dir: Path | None = None, is_main: bool = True) -> VLLMEngineBackend:
        if model_name is None:
            raise ValueError("vllm_engine needs the model folder to load")
        if on_cpu():
            os.environ.update(cpu_env(cfg.kv_cache_gib, bind_all=False))
        root = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="rl_small_rollout_"))
        return cls(model_name, tokenizer, root / "adapters", lora_rank, cfg.keep_versions, cfg.seed, cfg.sync,
                   max_model_len=cfg.max_model_len, dtype=cfg.vllm_dtype,
                   gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager)

    def _build(self, model: str) -> Any:
        from vllm import LLM

        lora = {"enable_lora": True, "max_lora_rank": lora_rank_bucket(self.lora_rank),
                "max_loras": self.keep + 1} if self.lora_rank and self.weights.lora_needed else {}
        return LLM(model=model, seed=self.seed, logprobs_mode="processed_logprobs", **lora, **self.engine_kwargs)

    def generate(self, prompts: list[Prompt], sampling: SamplingSpec) -> list[Rollout]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompt_ids = [self.tok(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
        reqs = expand_requests(len(prompts), sampling)
        if not reqs:
            return []
        greedy = sampling.temperature == 0
        # no per-request seed (see client.py): the engine's seed makes runs reproducible up to batching
        t0 = time.perf_counter()
        params = [SamplingParams(n=k, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                 top_p=1.0 if greedy else sampling.top_p, logprobs=0, skip_special_tokens=True,
                                 ignore_eos=sampling.ignore_eos)
                  for _, k in reqs]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids[i]) for i, _ in reqs], params,
                                    lora_request=self._lora(self.version), use_tqdm=False)
        out = []
        for (i, _), res in zip(reqs, outputs, strict=True):
            for c in sorted(res.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [float(d[t].logprob) for d, t in zip(c.logprobs, ids, strict=True)] if c.logprobs else None
                out.append(make_rollout(prompts[i], i, prompt_ids[i], ids, lps, c.finish_reason, self.version, self.tok))
        self.weights.chooser.observe_generation(sum(len(r.completion_ids) for r in out), time.perf_counter() - t0)
        return out

    def _lora(self, version: int) -> Any:
        if version not in self.paths:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(f"v{version}", version + 1, str(self.paths[version]))  # ids must be > 0

    def sync(self, weights: Path | Any, version: int) -> None:
        """Serve ``weights`` as ``version``: as an adapter or merged (rollout.sync), a full model by a rebuild."""
        self.weights.sync(weights, version, lambda w: self._sync_adapter(w, version), self._reload)
        self.version = version

    def _reload(self, folder: Path) -> None:
        """Load the full weights in ``folder`` into the engine in place and drop the prefix cache (KV of the old
        weights); vLLM also drops its loaded adapters, which a later adapter request loads from its folder again."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        self.llm.reset_prefix_cache()

    @property
    def metrics(self) -> dict[str, float]:
        """rollout/sync_merged and the auto sync measurements (weights.py)."""
        return self.weights.chooser.metrics()

    def _sync_adapter(self, weights: Path | Any, version: int) -> None:
        path, is_adapter = export_weights(weights, self.adapter_root, version, self.tok)
        if not is_adapter:
            del self.llm  # free the old engine first
            self.llm = self._build(str(path))
            return
        self.paths[version] = path
        self.llm.llm_engine.add_lora(self._lora(version))
        self.loaded.append(version)
        while len(self.loaded) > self.keep:
            old = self.loaded.pop(0)
            self.llm.llm_engine.remove_lora(old + 1)
            old_path = self.paths.pop(old)
            if self.adapter_root in old_path.parents:
                shutil.rmtree(old_path, ignore_errors=True)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
