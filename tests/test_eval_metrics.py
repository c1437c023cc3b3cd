"""pass@k and maj@k against hand-computed values; the greedy evaluator on the fake backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from rl_small.eval.metrics import majority_vote, pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (16, 4, 1, 0.25),  # pass@1 = c/n
        (4, 2, 2, 1 - 1 / 6),  # 1 - C(2,2)/C(4,2)
        (5, 0, 3, 0.0),
        (5, 5, 1, 1.0),
        (10, 3, 8, 1.0),  # n - c < k: every draw of 8 includes a correct one
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    ],
)
def test_pass_at_k(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="c=5"):
        pass_at_k(4, 5, 1)


def test_majority_vote_groups_equivalent_answers() -> None:
    assert majority_vote(["4", "5", "4.0", None, "5", "\\frac{8}{2}"]) == "4"
    assert majority_vote(["1", "2"]) == "1"  # tie -> earliest
    assert majority_vote([None, ""]) is None


def test_greedy_eval_on_fake_backend_is_exact(tiny_model_dir: Path) -> None:
    from rewards.math import MathAccuracy
    from rl_small.config import DataConfig
    from rl_small.data import build_prompts, load_task_rows
    from rl_small.eval import evaluate
    from rl_small.models import load_tokenizer
    from rl_small.rollout.fake import FakeBackend

    tok = load_tokenizer(str(tiny_model_dir))
    rows, _ = load_task_rows(DataConfig(), "eval", limit=4)
    prompts = build_prompts(rows, tok, DataConfig())
    # Scripted: right, wrong, right, garbage -> exactly 50 %.
    script = [f"\\boxed{{{rows[0]['answer']}}}", "\\boxed{-1}", f"so {rows[2]['answer']}", "banana"]
    result = evaluate(FakeBackend(tok, script), prompts, MathAccuracy(), max_new_tokens=64)
    assert result.accuracy == 0.5 and result.n == 4
    assert [s["correct"] for s in result.samples] == [True, False, True, False]
