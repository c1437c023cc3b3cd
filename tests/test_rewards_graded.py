"""Grade once (rewards.graded): the rewards of a batch that need correctness share one grading per completion.

The counts are of ``rewards.math._item_pairs`` (one call grades one completion, fast path included) and of the
items sent to math-verify (``GraderPool.run``). Before grade-once (main at eafbffd), the Memory-R+ + length
list below graded each completion four times: 64 gradings and 24 math-verify items for two batches of eight.
"""

from __future__ import annotations

from typing import Any

import pytest

import rewards.math as rmath
from rewards import CombinedReward, RewardComponent, build_reward
from rewards.graded import GradedBatch
from rewards.math import MathGrader
from rewards.math_grader import GraderPool

Q1, Q2 = "Simplify sqrt(8)/4.", "What is 6*7?"
COMPLETIONS = ["so \\boxed{\\frac{\\sqrt{2}}{2}}", "thus \\boxed{\\sqrt{2}/2}", "hmm \\boxed{\\sqrt{3}}", "no idea",
               "6*7 = 42 \\boxed{42}", "\\boxed{41}", "it is \\boxed{42.0}", "I think \\boxed{x+1}"]
GOLDS = ["\\frac{\\sqrt{2}}{2}"] * 4 + ["42"] * 4
KWARGS: dict[str, Any] = {
    "answer": GOLDS, "question": [Q1] * 4 + [Q2] * 4, "prompts": [Q1] * 4 + [Q2] * 4, "step": 0,
    "completion_ids": [[7] * n for n in (10, 30, 20, 5, 12, 40, 25, 8)], "group_id": [0] * 4 + [1] * 4,
}
MEMORY_R_PLUS = [("math_accuracy", 2.0, {"extract": "auto"}),
                 ("episodic_memory", 1.0, {"encoder": "hashing", "warmup_keys": 0}),
                 ("kimi_length", 1.0, {}), ("cosine_length", 1.0, {"max_tokens": 50})]
# The scores of main (eafbffd, each reward grading for itself) on this batch, the same on both batches.
MAIN_SCORES = {
    "math_accuracy": [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0],
    "episodic_memory": [2.0, 2.0, 0.0, 5.9605e-08, 2.0, 0.0, 2.0, 5.9605e-08],
    "kimi_length": [0.3, -0.5, -0.1, 0.0, 0.375, -0.5, -0.03125, 0.0],
    "cosine_length": [0.952254248594, 0.672745751406, -0.827254248594, -0.987764129074, 0.932242156855,
                      -0.547745751406, 0.75, -0.969076670011],
}
MAIN_TOTALS = [5.252254248594, 4.172745751406, -0.927254248594, -0.987764069469, 5.307242156855,
               -1.047745751406, 4.71875, -0.969076610406]


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Gradings (one per completion graded) and math-verify items, counted around the grader's functions."""
    got = {"gradings": 0, "math_verify_items": 0}
    item_pairs, run = rmath._item_pairs, GraderPool.run

    def counted_pairs(*a: Any, **k: Any) -> Any:
        got["gradings"] += 1
        return item_pairs(*a, **k)

    def counted_run(self: GraderPool, jobs: list[Any], timeout_s: float) -> Any:
        got["math_verify_items"] += len(jobs)
        return run(self, jobs, timeout_s)

    monkeypatch.setattr(rmath, "_item_pairs", counted_pairs)
    monkeypatch.setattr(GraderPool, "run", counted_run)
    return got


def combined(spec: list[tuple[str, float, dict[str, Any]]], **extra: Any) -> CombinedReward:
    return CombinedReward([RewardComponent(n, build_reward(n, p), w, timeout_s=120, native=True, **extra)
                           for n, w, p in spec])


def test_memory_r_plus_and_length_penalties_grade_each_completion_once(counts: dict[str, int]) -> None:
    """math_accuracy + episodic_memory + kimi_length + cosine_length, two batches of 8: 16 gradings (64 before)
    and 6 math-verify items (24 before: three items of each batch need it), with main's scores."""
    reward = combined(MEMORY_R_PLUS)
    for _ in range(2):
        totals, per, metrics = reward(COMPLETIONS, **KWARGS)
        assert per == {k: pytest.approx(v, abs=1e-9) for k, v in MAIN_SCORES.items()}
        assert totals == pytest.approx(MAIN_TOTALS, abs=1e-9)
        assert metrics["reward/math_accuracy/items_verified"] == 3.0  # the grading is counted by its first user
    assert counts == {"gradings": 16, "math_verify_items": 6}


def test_each_reward_alone_grades_itself_with_the_same_scores(counts: dict[str, int]) -> None:
    """Called outside a CombinedReward (a test, TRL's trainer) every reward grades the batch on its own."""
    for name, _, params in MEMORY_R_PLUS:
        assert build_reward(name, params)(COMPLETIONS, **KWARGS) == pytest.approx(MAIN_SCORES[name], abs=1e-9)
    assert counts == {"gradings": 32, "math_verify_items": 12}


def test_other_extract_modes_and_aliased_answers_are_graded_apart(counts: dict[str, int]) -> None:
    """Graders that can disagree are not shared: another extraction mode, or an answer column aliased from
    another dataset column, is graded again (once, however many rewards use it)."""
    spec = [("math_accuracy", 1.0, {}), ("kimi_length", 1.0, {}), ("cosine_length", 1.0, {"max_tokens": 50}),
            ("kimi_length", 1.0, {"extract": "boxed"})]
    comps = [RewardComponent(f"r{i}", build_reward(n, p), w, native=True) for i, (n, w, p) in enumerate(spec)]
    comps.append(RewardComponent("aliased", build_reward("math_accuracy"), columns={"wrong_gold": "answer"},
                                 native=True))
    _, per, _ = CombinedReward(comps)(COMPLETIONS, wrong_gold=["7"] * 8, **KWARGS)
    assert counts["gradings"] == 3 * 8
    assert per["aliased"] == [0.0] * 8 and per["r0"] == MAIN_SCORES["math_accuracy"]


def test_trl_style_functions_are_called_as_before(counts: dict[str, int]) -> None:
    """A TRL-style reward (``f(completions, **kwargs)``, or with named columns only) gets the keywords it got
    before, no ``correct``; a plug-in that declares a ``grader`` reads the shared column."""
    seen: dict[str, Any] = {}

    def trl_style(completions: list[str], **kwargs: Any) -> list[float]:
        seen["trl"] = sorted(kwargs)
        return [1.0] * len(completions)

    def named(completions: list[str], answer: list[str]) -> list[float]:
        return [float(c.endswith("}")) for c in completions]

    class Plugin:
        grader = MathGrader()

        def __call__(self, completions: list[str], correct: list[bool] | None = None, **kwargs: Any) -> list[float]:
            seen["plugin"] = correct
            return [0.0] * len(completions)

    comps = [RewardComponent("acc", build_reward("math_accuracy"), native=True), RewardComponent("trl", trl_style),
             RewardComponent("named", named), RewardComponent("plugin", Plugin())]
    _, per, _ = CombinedReward(comps)(COMPLETIONS, graded=["a column named graded"] * 8, **KWARGS)
    assert "correct" not in seen["trl"] and "graded" in seen["trl"] and "answer" in seen["trl"]
    assert per["trl"] == [1.0] * 8 and per["named"] == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert seen["plugin"] == [bool(s) for s in MAIN_SCORES["math_accuracy"]]
    assert counts["gradings"] == 8


def test_a_failed_grading_is_the_failing_components_and_the_next_one_grades_again(counts: dict[str, int]) -> None:
    """No answer column: the first reward that needs correctness fails (counted), the next tries again and
    fails too; neither silently scores."""
    kw = {k: v for k, v in KWARGS.items() if k != "answer"}
    reward = combined([("kimi_length", 1.0, {}), ("cosine_length", 1.0, {"max_tokens": 50})])
    _, per, metrics = reward(COMPLETIONS, **kw)
    assert per == {"kimi_length": [None] * 8, "cosine_length": [None] * 8}
    assert metrics["reward/kimi_length/errors"] == 1.0 and metrics["reward/cosine_length/errors"] == 1.0
    assert counts["gradings"] == 0


def test_graded_batch_refuses_a_grader_with_the_wrong_length() -> None:
    class Short:
        key, columns = ("short",), ()

        def __call__(self, completions: list[str], **kw: Any) -> list[bool]:
            return [True]

    with pytest.raises(ValueError, match="1 verdicts for 2 completions"):
        GradedBatch().correct(Short(), ["a", "b"], {})
