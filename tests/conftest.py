"""Shared fixtures: a tiny random Llama with a locally trained tokenizer (offline, built in ~1 s)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real data for the tests that read it (each skips when its folder is absent): $RL_SMALL_DATA, else the checkout's
# data/ (`rl-small data download --out data`), else shared/data beside the checkout.
_DATA = [Path(os.environ["RL_SMALL_DATA"])] if os.environ.get("RL_SMALL_DATA") else []
SHARED_DATA = next((p for p in (*_DATA, ROOT / "data", ROOT.parent / "shared" / "data") if p.is_dir()),
                   ROOT.parent / "shared" / "data")
CHECKOUT_RUNS = ROOT / "runs"


@pytest.fixture(autouse=True)
def _no_runs_folder_in_the_checkout() -> Iterator[None]:
    """A test writes its runs under tmp_path: one that creates ``runs/`` in the checkout (a command run without
    ``--out`` / ``train.output_dir`` from the repository root) fails, naming itself."""
    before = CHECKOUT_RUNS.exists()
    yield
    if not before and CHECKOUT_RUNS.exists():
        made = sorted(p.name for p in CHECKOUT_RUNS.iterdir())
        import shutil

        shutil.rmtree(CHECKOUT_RUNS, ignore_errors=True)
        pytest.fail(f"this test left {CHECKOUT_RUNS} ({made}): pass --out / train.output_dir under tmp_path")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _build_tiny(path: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rl_small.data.arith import generate_arith

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [r["question"] + " \\boxed{" + r["answer"] + "}" for r in generate_arith("train", 200, 1)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_overrides(tiny_model_dir: Path, tmp_path: Path) -> list[str]:
    """Overrides that turn the default recipe into a seconds-long run on the tiny model."""
    return [
        f"model.name={tiny_model_dir}",
        "model.lora.r=4",
        "rollout.backend=hf",  # not auto: where vllm is installed, auto would spawn a server per test
        "model.lora.targets=[q_proj, v_proj]",
        "data.num_train=64",
        "rollout.group_size=4",
        "rollout.prompts_per_step=2",
        "rollout.max_new_tokens=8",
        "algo.micro_batch_size=4",
        "optim.lr=0.01",
        "train.steps=2",
        "train.eval_before=false",
        "train.eval_after=false",
        "train.progress=false",
        "train.trackers=[]",
        f"train.output_dir={tmp_path}",
        "train.run_name=t",
    ]
