"""Recipe rehearsal: run a shipped (GPU) recipe unchanged on CPU, with a small random model of its architecture.

    table = load_model_table(fixtures)                  # recipe model.name -> real config.json values + tokenizer
    model_dir = build_model(fixture_for(cfg.model.name, table, fixtures), out_dir, corpus)
    overrides = rehearsal_overrides(cfg, model_dir, data_root, RehearsalShape(backend="hf"), output_dir, "r")
    summary = rl_small.train.run(argparse.Namespace(recipe=path, resume=None, overrides=overrides))

What a rehearsal changes, and nothing else:
- the model: a randomly initialised model of the recipe's architecture, built from the real model's
  ``config.json`` values (a fixture row keyed by the recipe's ``model.name``) with 2 layers and one KV head
  (smaller hidden size; same head dimension, GQA group, MLP ratio, vocabulary size, rope, tying, token ids);
- its tokenizer: byte-level BPE trained on the fixture text, padded to the real tokenizer's size, with the
  family's special tokens at their real ids and the family's chat template (``tokenizers/<family>.json``);
- the backend (``hf`` or ``vllm_server``), ``rollout.max_new_tokens`` and the evaluation size (capped for
  time), ``train.steps``, the data source (local fixture files in the hub's formats), output folders;
- unless ``full_batch``: ``rollout.prompts_per_step``, cut to the fewest prompts that fill each micro-batch
  once (``rehearsal_prompts``): every forward/backward keeps the recipe's shape, there are just fewer of them.
Dtype, gradient checkpointing, LoRA, algorithm, KL, critic, rewards, sampling, micro-batch size, group size,
minibatches, epochs and schedule are the recipe's own.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rl_small.config import RunConfig

log = logging.getLogger(__name__)

SHRUNK_LAYERS = 2
TRAINED_BPE_TOKENS = 2000  # real merges learnt from the fixture text, so prompts tokenize to word-like pieces


class UnknownModelError(ValueError):
    """A recipe names a model that has no architecture fixture."""


@dataclass(frozen=True)
class ModelFixture:
    """The real model's ``config.json`` values and its tokenizer's shape (size, special ids, chat template)."""

    name: str
    config: dict[str, Any]
    tokenizer: dict[str, Any]


@dataclass(frozen=True)
class RehearsalShape:
    """What a rehearsal caps: backend, completion length, steps, held-out problems."""

    backend: str = "hf"
    max_new_tokens: int = 16
    steps: int = 2
    eval_samples: int = 2
    full_batch: bool = False  # False: prompts_per_step cut to the fewest that fill every micro-batch once


def rehearsal_prompts(cfg: RunConfig) -> int:
    """Prompts per step that still fill one whole micro-batch in each minibatch: minibatches x
    ceil(micro_batch_size / group_size), at most the recipe's own. The shapes of a forward / backward (micro-batch
    x sequence x vocabulary) stay the recipe's; only the number of identical micro-batches per step drops."""
    a, r = cfg.algo, cfg.rollout
    return min(r.prompts_per_step, a.minibatches * -(-a.micro_batch_size // r.group_size))


def load_model_table(root: str | Path) -> dict[str, ModelFixture]:
    """``root/models.json``: model name (as recipes spell it) -> config file and tokenizer spec file."""
    root = Path(root)
    rows = json.loads((root / "models.json").read_text())
    return {
        name: ModelFixture(name, json.loads((root / r["config"]).read_text()),
                           json.loads((root / r["tokenizer"]).read_text()))
        for name, r in rows.items()
    }


def fixture_for(name: str, table: dict[str, ModelFixture], root: str | Path) -> ModelFixture:
    """The fixture of ``name``; an unknown model is an error that says how to add one."""
    if name not in table:
        raise UnknownModelError(
            f"rehearsal: no architecture fixture for model.name {name!r}: add the model's config.json values to "
            f"{Path(root) / 'configs'}, a tokenizer spec to {Path(root) / 'tokenizers'} and a row to "
            f"{Path(root) / 'models.json'} (known: {sorted(table)})"
        )
    return table[name]


def shrink_config(real: dict[str, Any], layers: int = SHRUNK_LAYERS) -> dict[str, Any]:
    """The real config with ``layers`` layers and one KV head: the real head dimension and GQA group (query heads
    per KV head) are kept, so hidden size = group x head_dim; also the MLP/hidden ratio, the vocabulary, rope,
    tying and token ids. (vLLM's CPU attention only takes head sizes 32..512, and GPU kernels are picked by the
    head size too: the head dimension is the one to keep.)"""
    heads = int(real["num_attention_heads"])
    kv = int(real.get("num_key_value_heads") or heads)
    head_dim = int(real.get("head_dim") or real["hidden_size"] // heads)
    group = heads // kv
    hidden = group * head_dim
    ratio = real["intermediate_size"] / real["hidden_size"]
    small = {k: v for k, v in real.items() if k not in ("torch_dtype", "dtype", "transformers_version")}
    small.update(num_hidden_layers=layers, hidden_size=hidden, head_dim=head_dim, num_attention_heads=group,
                 num_key_value_heads=1, intermediate_size=max(16, round(ratio * hidden / 16) * 16))
    if "max_window_layers" in real:
        small["max_window_layers"] = min(int(real["max_window_layers"]), layers)
    return small


def _trained_bpe(corpus: list[str], vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Tokens and merges of a byte-level BPE learnt from ``corpus`` (no special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return tokens, merges  # type: ignore[return-value]


def build_tokenizer(spec: dict[str, Any], corpus: list[str], out_dir: Path) -> Any:
    """A tokenizer of exactly ``spec['size']`` ids: specials at their real ids, learnt BPE pieces, then filler
    pieces (``" w<i>"``) so that every id the model can sample decodes to text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    size, specials = int(spec["size"]), dict(spec["specials"])
    if any(not 0 <= i < size for i in specials.values()):
        raise ValueError(f"tokenizer spec: special ids {specials} must lie in [0, {size})")
    pieces, merges = _trained_bpe(corpus, TRAINED_BPE_TOKENS)
    taken = set(pieces) | set(specials)
    free = (i for i in range(size) if i not in set(specials.values()))
    vocab: dict[str, int] = dict(specials)
    n = 0
    for piece in pieces:
        vocab[piece] = next(free)
    for i in free:
        while f"Ġw{n}" in taken:
            n += 1
        vocab[f"Ġw{n}"] = i
        n += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec.get("bos_token"), eos_token=spec["eos_token"],
        pad_token=spec.get("pad_token"),
    )
    fast.chat_template = spec["chat_template"]
    wrong = {t: fast.convert_tokens_to_ids(t) for t, i in specials.items() if fast.convert_tokens_to_ids(t) != i}
    if wrong or len(fast) != size:
        raise ValueError(f"tokenizer build: size {len(fast)} (want {size}), specials at wrong ids: {wrong}")
    fast.save_pretrained(out_dir)
    # The real tokenizer_config.json's class: without it transformers picks one from config.json's model_type.
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"tokenizer_class": spec["tokenizer_class"]}))
    return fast


def build_model(fixture: ModelFixture, out_dir: str | Path, corpus: list[str], seed: int = 0,
                full_size: bool = False, device: str = "cpu") -> Path:
    """Write a random model of ``fixture``'s shrunk architecture (``full_size``: the real one, every layer and
    width) and its tokenizer to ``out_dir`` (bf16 weights, initialised on ``device``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(fixture.tokenizer, corpus, out)
    tok = AutoTokenizer.from_pretrained(out)  # as the trainer will load it (its class may add tokens)
    drop = ("torch_dtype", "dtype", "transformers_version")
    small = {k: v for k, v in fixture.config.items() if k not in drop} if full_size else shrink_config(fixture.config)
    if len(tok) > small["vocab_size"]:
        raise ValueError(f"{fixture.name}: tokenizer has {len(tok)} ids, the model's vocabulary {small['vocab_size']}")
    small.pop("architectures", None)
    config = AutoConfig.for_model(small.pop("model_type"), **small)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out)
    log.info("rehearsal model for %s: %s layers, hidden %s, vocab %s -> %s", fixture.name,
             config.num_hidden_layers, config.hidden_size, config.vocab_size, out)
    return out


def fixture_corpus(data_root: str | Path) -> list[str]:
    """Text the rehearsal tokenizer's BPE is learnt from: the fixture rows, prompt templates, arith problems."""
    from rl_small.data.arith import generate_arith
    from rl_small.data.templates import TEMPLATES

    texts = [t.format(question="") for t in TEMPLATES.values()]
    for f in sorted(Path(data_root).glob("*/*.jsonl")):
        texts += [" ".join(str(v) for v in json.loads(line).values()) for line in f.read_text().splitlines() if line]
    texts += [r["question"] + " \\boxed{" + r["answer"] + "}" for r in generate_arith("train", 200, 2)]
    return texts


def _data_overrides(cfg: RunConfig, data_root: Path) -> list[str]:
    """Point data.path (and each data.mix entry's path) at the fixture folder of its task."""
    from rl_small.data.registry import ARITH_TASK

    def folder(task: str) -> Path:
        path = data_root / task
        if not path.is_dir():
            raise UnknownModelError(f"rehearsal: no fixture data for task {task!r}: add {path}/<split>.jsonl "
                                    "rows in the hub dataset's format")
        return path

    out = [] if cfg.data.task == ARITH_TASK else [f"data.path={folder(cfg.data.task)}"]
    if cfg.data.mix:
        mix = [m.model_dump(exclude_none=True) | ({} if m.task == ARITH_TASK else {"path": str(folder(m.task))})
               for m in cfg.data.mix]
        out.append(f"data.mix={json.dumps(mix)}")
    return out


def backend_overrides(cfg: RunConfig, backend: str) -> list[str]:
    """The overrides that switch ``cfg`` to rollout ``backend`` (a rehearsal on hf of a vLLM recipe): the backend,
    and each option of another backend that the recipe sets, back at its default (else an error under it)."""
    from rl_small.config import ROLLOUT_OWNERS, RolloutConfig
    from rl_small.config_algo import check_owners

    used = {"hf", "vllm_server"} if backend == "auto" else {backend}
    fields = RolloutConfig.model_fields
    return [f"rollout.backend={backend}", *(f"rollout.{k}={json.dumps(fields[k].get_default(call_default_factory=True))}"
                                            for k in check_owners(cfg.rollout, ROLLOUT_OWNERS, used))]


def rehearsal_overrides(
    cfg: RunConfig, model_dir: str | Path, data_root: str | Path, shape: RehearsalShape, output_dir: str | Path,
    run_name: str,
) -> list[str]:
    """The overrides that turn ``cfg`` (a loaded recipe) into its rehearsal; everything else stays."""
    t = cfg.train
    out = [
        f"model.name={model_dir}",
        *backend_overrides(cfg, shape.backend),  # and the recipe's vLLM options at their defaults under hf
        f"rollout.max_new_tokens={min(cfg.rollout.max_new_tokens, shape.max_new_tokens)}",
        f"train.steps={shape.steps}",
        f"train.eval_samples={min(t.eval_samples, shape.eval_samples)}",
        f"train.eval_max_new_tokens={min(t.eval_max_new_tokens or shape.max_new_tokens, shape.max_new_tokens)}",
        f"train.output_dir={output_dir}",
        f"train.run_name={run_name}",
        "train.progress=false",
        "train.trackers=[]",
    ]
    if not shape.full_batch:
        out.append(f"rollout.prompts_per_step={rehearsal_prompts(cfg)}")
    if shape.backend == "vllm_server":
        out.append("rollout.spawn=true")
    return out + _data_overrides(cfg, Path(data_root))
