"""Architecture numbers of the shipped recipes' models and of local model folders, for ``rl-small plan``.

    arch = load_arch("Qwen/Qwen2.5-0.5B-Instruct")   # from the packaged table (no download)
    arch = load_arch("/path/to/model")               # from the folder's config.json
    arch.params()                                    # parameter count of the base model

The table holds the values of each model's public ``config.json`` on the Hugging Face hub; a hub id that is
not in it is an error asking for a local folder, because ``plan`` never downloads anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    """A Llama-style decoder (Llama, Qwen2, SmolLM2): the numbers memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of one decoder layer, by PEFT target name."""
        h, i, q, k = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return {"q_proj": (h, q), "k_proj": (h, k), "v_proj": (h, k), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def params(self) -> int:
        """Parameters of the base model (embedding, decoder layers, final norm, untied LM head)."""
        per_layer = sum(a * b for a, b in self.module_dims().values()) + 2 * self.hidden
        if self.attention_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * per_layer + self.hidden + head


def _qwen2(layers: int, hidden: int, inter: int, heads: int, kv: int, tied: bool) -> Arch:
    return Arch(layers, hidden, inter, heads, kv, hidden // heads, 151936, tied, attention_bias=True)


# Values of the public config.json files (num_hidden_layers, hidden_size, intermediate_size,
# num_attention_heads, num_key_value_heads, head_dim, vocab_size, tie_word_embeddings).
KNOWN_ARCHS: dict[str, Arch] = {
    "Qwen/Qwen2.5-0.5B-Instruct": _qwen2(24, 896, 4864, 14, 2, tied=True),
    "Qwen/Qwen2.5-1.5B-Instruct": _qwen2(28, 1536, 8960, 12, 2, tied=True),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": _qwen2(28, 1536, 8960, 12, 2, tied=False),
    "meta-llama/Llama-3.2-1B-Instruct": Arch(16, 2048, 8192, 32, 8, 64, 128256, tied=True),
    "HuggingFaceTB/SmolLM2-135M-Instruct": Arch(30, 576, 1536, 9, 3, 64, 49152, tied=True),
}
KNOWN_ARCHS["smollm2-135m-instruct"] = KNOWN_ARCHS["HuggingFaceTB/SmolLM2-135M-Instruct"]  # built-in alias


def arch_from_config(cfg: dict) -> Arch:
    """An ``Arch`` from a config.json mapping (Llama / Qwen2 / Mistral-style keys)."""
    try:
        heads = cfg["num_attention_heads"]
        return Arch(
            layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
            heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
            tied=bool(cfg.get("tie_word_embeddings", True)),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        )
    except KeyError as err:
        raise ValueError(f"config.json has no {err.args[0]!r}: plan knows Llama-style decoders only") from None


def load_arch(name: str) -> Arch:
    """The architecture of ``model.name``: a local folder's config.json, else the packaged table."""
    path = Path(name).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"model folder {str(path)!r} has no config.json")
        return arch_from_config(json.loads(cfg_file.read_text()))
    if name in KNOWN_ARCHS:
        return KNOWN_ARCHS[name]
    raise ValueError(f"model.name {name!r}: no local folder and not a known model ({', '.join(KNOWN_ARCHS)}); "
                     "plan never downloads: pass model.name=<local folder with config.json>")
