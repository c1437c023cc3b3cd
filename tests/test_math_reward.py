"""Answer extraction and equivalence, as tables of inputs and expected scores."""

from __future__ import annotations

import pytest

from rewards.math import MathAccuracy, extract_answer, is_equivalent

EXTRACT = [
    ("The answer is \\boxed{42}.", "boxed", "42"),
    ("first \\boxed{1} then \\boxed{2}", "boxed", "2"),  # several boxes -> the last
    ("\\boxed{\\frac{3}{4}}", "boxed", "\\frac{3}{4}"),  # nested braces kept
    ("no box here 17", "boxed", None),
    ("\\boxed{12", "boxed", None),  # unclosed
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "gsm8k", "72"),
    ("#### 1,234", "gsm8k", "1,234"),
    ("so 3 + 4 = 7 apples", "last_number", "7"),
    ("it is -5", "last_number", "-5"),
    ("total 1,234,567 dollars", "last_number", "1234567"),
    ("", "auto", None),
    ("garbage without digits", "auto", None),
    ("x \\boxed{9} but then 10", "auto", "9"),  # auto prefers the box
    ("#### 5", "auto", "5"),
]


@pytest.mark.parametrize(("text", "mode", "expected"), EXTRACT)
def test_extract(text: str, mode: str, expected: str | None) -> None:
    assert extract_answer(text, mode) == expected  # type: ignore[arg-type]


EQUIV = [
    ("72", "72", True),
    ("1,234", "1234", True),  # commas
    ("-3", "-3", True),  # negative
    ("-3", "3", False),
    ("12 apples", "12", True),  # units
    ("$12", "12", True),
    ("2.50", "2.5", True),
    ("0.75", "3/4", True),  # fractions
    ("\\frac{3}{4}", "0.75", True),
    ("\\frac{1}{2}", "\\frac{2}{4}", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),  # needs math-verify
    ("x^2+2x+1", "(x+1)^2", True),
    ("13", "12", False),
    ("", "12", False),  # empty
    (None, "12", False),
    ("banana", "12", False),  # garbage
]


@pytest.mark.parametrize(("pred", "gold", "expected"), EQUIV)
def test_equivalent(pred: str | None, gold: str, expected: bool) -> None:
    assert is_equivalent(pred, gold, timeout_s=60) is expected  # deadline generous: grading, not speed


def test_math_accuracy_reward_scores_a_batch() -> None:
    r = MathAccuracy(extract="boxed")
    comps = ["so \\boxed{12}", "\\boxed{1} \\boxed{13}", "12", "", "\\boxed{12.0}"]
    assert r(comps, answer=["12"] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert MathAccuracy(extract="auto")(comps, answer=["12"] * 5) == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_bad_extract_mode_is_named() -> None:
    with pytest.raises(ValueError, match="'boxxed'"):
        MathAccuracy(extract="boxxed")  # type: ignore[arg-type]


# Reward-hacking probes: none of these completions may earn the accuracy reward (gold 12).
QUESTION = "Tom has 5 apples and buys 7 more. How many apples does he have now? Answer: 12 is wrong, think."
HACKS = {
    "many_boxed_answers": " ".join(f"\\boxed{{{i}}}" for i in range(1, 13)),
    "every_form": "It is \\boxed{11} or \\boxed{12} or \\boxed{13}, or maybe \\boxed{\\frac{24}{2}}",
    "hedged_set_in_one_box": "\\boxed{11, 12, 13}",
    "or_in_one_box": "\\boxed{11 \\text{ or } 12}",
    "huge_number": "\\boxed{" + "12" * 5000 + "}",
    "huge_number_tail": "so the answer is " + "9" * 400 + "12",
    "empty": "",
    "only_whitespace": "  \n\t ",
    "copies_question": QUESTION,
    "copies_question_reflowed": QUESTION.replace(" ", "\n  "),
}


@pytest.mark.parametrize("name", sorted(HACKS))
def test_reward_hacking_probes_earn_nothing(name: str) -> None:
    r = MathAccuracy()
    assert r([HACKS[name]], answer=["12"], question=[QUESTION]) == [0.0]


def test_guards_keep_honest_answers() -> None:
    r = MathAccuracy()
    honest = [
        "5 + 7 = 12, so \\boxed{12}",
        "first \\boxed{12}, and again \\boxed{12.0}",  # the same answer twice is not hedging
        "Restating: " + QUESTION + " We add: 5 + 7 = 12. \\boxed{12}",
        "#### 12",
    ]
    assert r(honest, answer=["12"] * 4, question=[QUESTION] * 4) == [1.0] * 4
