"""Length rewards against hand-computed values (METHODS.md §4)."""

from __future__ import annotations

import math

import pytest

from rewards.length import CosineLength, KimiLength, L1Length, SoftOverlong, TLDRLength


def ids(n: int) -> list[int]:
    return [7] * n


@pytest.mark.parametrize(("n", "expected"), [(0, 0.0), (384, 0.0), (385, -1 / 128), (448, -0.5), (512, -1.0), (600, -1.0)])
def test_soft_overlong(n: int, expected: float) -> None:
    assert SoftOverlong(max_tokens=512, buffer=128)([""], completion_ids=[ids(n)]) == [pytest.approx(expected)]


def test_soft_overlong_rejects_bad_buffer() -> None:
    with pytest.raises(ValueError, match="buffer=600"):
        SoftOverlong(max_tokens=512, buffer=600)


def test_kimi_group_relative() -> None:
    r = KimiLength()
    comps = ["\\boxed{4}", "\\boxed{4}", "\\boxed{5}", "\\boxed{5}", "\\boxed{4}", "\\boxed{4}"]
    lens = [ids(10), ids(30), ids(10), ids(20), ids(5), ids(5)]
    out = r(comps, completion_ids=lens, group_id=[0, 0, 0, 0, 1, 1], answer=["4"] * 6)
    # group 0: min 10, max 30 -> lambda = 0.5, -0.5, 0.5, 0.0; wrong ones get min(0, lambda)
    assert out == [0.5, -0.5, 0.0, 0.0, 0.0, 0.0]  # group 1: equal lengths -> 0
    assert KimiLength(start_step=5)(comps, completion_ids=lens, group_id=[0] * 6, answer=["4"] * 6, step=4) == [0.0] * 6


def test_cosine_length() -> None:
    r = CosineLength(max_tokens=100)
    out = r(["\\boxed{1}", "\\boxed{1}", "\\boxed{2}", "\\boxed{2}", "\\boxed{1}"],
            completion_ids=[ids(0), ids(100), ids(0), ids(100), ids(101)], answer=["1"] * 5)
    assert out[0] == pytest.approx(1.0) and out[1] == pytest.approx(0.5)  # correct: shorter is better
    assert out[2] == pytest.approx(-1.0) and out[3] == pytest.approx(-0.5)  # wrong: longer is penalised less
    assert out[4] == -10.0
    mid = r(["\\boxed{1}"], completion_ids=[ids(50)], answer=["1"])[0]
    assert mid == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi / 2)))


def test_l1_exact_and_max_with_target_from_prompt_or_recipe() -> None:
    prompts = ["Solve. Think for 100 tokens.", "no target here"]
    exact = L1Length(mode="exact")(["\\boxed{3}", "\\boxed{3}"], completion_ids=[ids(60), ids(60)],
                                   prompts=prompts, answer=["3", "3"])
    assert exact[0] == pytest.approx(1 - 3e-4 * 40) and exact[1] is None
    mx = L1Length(mode="max", alpha=0.01, target_tokens=50)(
        ["\\boxed{3}", "\\boxed{3}", "\\boxed{9}"], completion_ids=[ids(40), ids(100), ids(10)],
        prompts=["", "", ""], answer=["3", "3", "3"],
    )
    assert mx == [pytest.approx(0.6), 0.0, 0.0]  # clip(0.01*10+0.5), clip(-0.5+0.5)=0, wrong -> 0


def test_tldr_levels_from_column_prompt_or_default() -> None:
    r = TLDRLength(budgets={"short": 10, "medium": 20, "long": 40}, alpha=1.0)
    ok, bad = "\\boxed{3}", "\\boxed{4}"
    ids = [[0] * n for n in (10, 15, 30, 15, 15, 60)]
    prompts = ["Use short reasoning.", "Use short reasoning.", "Use medium reasoning.", "no level", "x", "x"]
    levels = [None, None, None, None, "long", "long"]
    out = r([ok, ok, ok, ok, ok, bad], completion_ids=ids, answer=["3"] * 6, prompts=prompts,
            length_level=[lv or "" for lv in levels])
    # short B=10: 10 -> 1; 15 -> 1 - 5/10; medium B=20: 30 -> 1 - 10/20; default medium: 15 -> 1;
    # long B=40: 15 -> 1; wrong answer -> 0 whatever its length.
    assert out == pytest.approx([1.0, 0.5, 0.5, 1.0, 1.0, 0.0])
    far = r([ok], completion_ids=[[0] * 100], answer=["3"], prompts=["short reasoning"])
    assert far == [0.0]  # credit floors at 0
    with pytest.raises(ValueError, match="default_level 'tiny'"):
        TLDRLength(default_level="tiny")
