"""The trainer's paths train the same adapter, bit for bit, as the code before issue 16 moved batch production
into the rollout stream and made the group a type (commit 6826d58).

Each digest is a sha256 over the LoRA parameters after the steps below, recorded at that commit on CPU with the
torch below and one thread (with two, CPU reductions are not reproducible run to run even at that commit);
other torch builds may round differently, so the test skips there. Re-record with ``_digest`` after a run of a
trusted commit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rl_small.config import load_recipe
from rl_small.trainer import Trainer

RECORDED_TORCH = "2.13.0+cpu"
TOKENS = "rewards=[{name: 'tests.helpers:token_reward'}]"
CASES = {  # overrides on tiny_overrides -> digest at commit 6826d58
    # the default GRPO path: hf generation, one epoch and minibatch, micro-batches of two sequences
    "default": ([TOKENS, "train.steps=3", "algo.micro_batch_size=2"],
                "1bf000e4b891197cb770a8f445909e57f7e2af46f9dbf20230c4206f764363fb"),
    # the group machinery: dynamic sampling's refill rounds, overlong filtering, groups shuffled into minibatches
    "groups": (["train.steps=3", "rollout.backend=fake", "rollout.fake_completions=['1', '22', '\\boxed{3}', '4', '55']",
                "sampling.dynamic_sampling=true", "sampling.dynamic_sampling_on=reward", "algo.minibatches=2", "algo.epochs=2",
                "rollout.prompts_per_step=3", "sampling.overlong_filter=true", "algo.micro_batch_size=2"],
               "69d465b8b669b25aabc9bba8d0a5dfcbd069b0acf8bdc547643e0a38c042f79a"),
    # PPO: critic, KL in the loss, two epochs (pi_old)
    "ppo": (["train.steps=2", "algo.name=ppo", "algo.kl_coef=0.05", "algo.epochs=2"],
            "840d7b5e7e14b9680cf0fb1d1e7b1d3cdc2454cf172b13e8412a33a27f2f8d67"),
}


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name:
            h.update(name.encode())
            h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_is_bit_identical_to_the_code_before_the_rollout_stream(
    case: str, tiny_overrides: list[str], tmp_path: Path, one_thread: None
) -> None:
    if torch.__version__ != RECORDED_TORCH:
        pytest.skip(f"digests recorded with torch {RECORDED_TORCH}, this is {torch.__version__}")
    overrides, digest = CASES[case]
    tr = Trainer(load_recipe(None, [*tiny_overrides, *overrides]), tmp_path / "t")
    before = _digest(tr.model)
    tr.fit()
    assert _digest(tr.model) != before, "the steps changed nothing"
    assert _digest(tr.model) == digest
