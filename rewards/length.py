"""Length rewards and penalties (docs/METHODS.md §4), each a registered reward with its own parameters.

Lengths are completion token counts (``completion_ids``). Correctness, where a formula needs it, is the
``math_accuracy`` verdict against the ``answer`` column: the batch's shared ``correct`` column in a run (graded
once for every reward that needs it, ``rewards.graded``), graded by the reward's own ``MathGrader`` (``extract``
mode) when it is called alone.

- ``soft_overlong``  DAPO (arXiv 2503.14476) soft overlong punishment.
- ``kimi_length``    Kimi k1.5 (arXiv 2501.12599) group-relative length reward, optional warm-up.
- ``cosine_length``  "Demystifying Long CoT" (arXiv 2502.03373) cosine length-scaled reward.
- ``l1_length``      L1 / LCPO (arXiv 2503.04697): exact or max target-length reward.
- ``tldr_length``    TLDR-style (arXiv 2505.07961) multi-level (short / medium / long) length budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Literal

from rewards.base import register_reward
from rewards.graded import correct_or_grade
from rewards.math import ExtractMode, MathGrader

Verdicts = Sequence[bool | None] | None  # the shared ``correct`` column, when the combination passes it


@register_reward("soft_overlong")
class SoftOverlong:
    """0 up to L_max - L_c tokens, then linear down to -1 at L_max, -1 beyond (DAPO, Eq. 13)."""

    def __init__(self, max_tokens: int, buffer: int) -> None:
        if not 0 < buffer <= max_tokens:
            raise ValueError(f"soft_overlong: need 0 < buffer <= max_tokens, got buffer={buffer}, max_tokens={max_tokens}")
        self.max_tokens, self.buffer = max_tokens, buffer

    def __call__(self, completions: list[str], completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        start = self.max_tokens - self.buffer
        out = []
        for ids in completion_ids:
            n = len(ids)
            out.append(0.0 if n <= start else (start - n) / self.buffer if n <= self.max_tokens else -1.0)
        return out


@register_reward("kimi_length")
class KimiLength:
    """Per group: lambda_i = 0.5 - (len_i - min)/(max - min); correct -> lambda_i, wrong -> min(0, lambda_i);
    0 for a group whose lengths are all equal, and 0 for every completion before ``start_step``."""

    def __init__(self, extract: ExtractMode = "auto", start_step: int = 0) -> None:
        self.grader, self.start_step = MathGrader(extract), start_step

    def __call__(
        self, completions: list[str], completion_ids: list[list[int]], group_id: list[int],
        answer: list[Any] | None = None, step: int = 0, correct: Verdicts = None, **kwargs: Any,
    ) -> list[float]:
        if step < self.start_step:
            return [0.0] * len(completions)
        correct = correct_or_grade(self.grader, completions, correct, answer=answer, question=kwargs.get("question"))
        lengths = [len(ids) for ids in completion_ids]
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(group_id):
            groups.setdefault(g, []).append(i)
        out = [0.0] * len(completions)
        for idx in groups.values():
            lo, hi = min(lengths[i] for i in idx), max(lengths[i] for i in idx)
            if hi == lo:
                continue
            for i in idx:
                lam = 0.5 - (lengths[i] - lo) / (hi - lo)
                out[i] = lam if correct[i] else min(0.0, lam)
        return out


@register_reward("cosine_length")
class CosineLength:
    """r = eta_min + (eta_max - eta_min)(1 + cos(pi L / L_max)) / 2 with (eta_min, eta_max) = (min_correct,
    max_correct) for correct and (max_wrong, min_wrong) for wrong answers; ``exceed_penalty`` past L_max."""

    def __init__(
        self, max_tokens: int, min_correct: float = 0.5, max_correct: float = 1.0, min_wrong: float = -1.0,
        max_wrong: float = -0.5, exceed_penalty: float = -10.0, extract: ExtractMode = "auto",
    ) -> None:
        self.max_tokens, self.grader, self.exceed_penalty = max_tokens, MathGrader(extract), exceed_penalty
        self.correct_range = (min_correct, max_correct)
        self.wrong_range = (max_wrong, min_wrong)  # swapped: a longer wrong answer is penalised less

    def __call__(
        self, completions: list[str], completion_ids: list[list[int]], answer: list[Any] | None = None,
        correct: Verdicts = None, **kwargs: Any,
    ) -> list[float]:
        correct = correct_or_grade(self.grader, completions, correct, answer=answer, question=kwargs.get("question"))
        out = []
        for ids, ok in zip(completion_ids, correct, strict=True):
            n = len(ids)
            if n > self.max_tokens:
                out.append(self.exceed_penalty)
                continue
            lo, hi = self.correct_range if ok else self.wrong_range
            out.append(lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * n / self.max_tokens)))
        return out


_TARGET = re.compile(r"[Tt]hink for (\d+) tokens")


@register_reward("l1_length")
class L1Length:
    """L1-Exact: 1[correct] - alpha |n_gold - L|; L1-Max: 1[correct] * clip(alpha (n_gold - L) + delta, 0, 1).

    ``n_gold`` is read from the prompt ("Think for N tokens") or given as ``target_tokens``; a completion whose
    prompt has neither abstains (None)."""

    def __init__(
        self, mode: Literal["exact", "max"] = "exact", alpha: float = 3e-4, delta: float = 0.5,
        target_tokens: int | None = None, extract: ExtractMode = "auto",
    ) -> None:
        if mode not in ("exact", "max"):
            raise ValueError(f"l1_length: mode must be 'exact' or 'max', got {mode!r}")
        self.mode, self.alpha, self.delta, self.target = mode, alpha, delta, target_tokens
        self.grader = MathGrader(extract)

    def __call__(
        self, completions: list[str], completion_ids: list[list[int]], prompts: list[str] | None = None,
        answer: list[Any] | None = None, correct: Verdicts = None, **kwargs: Any,
    ) -> list[float | None]:
        correct = correct_or_grade(self.grader, completions, correct, answer=answer, question=kwargs.get("question"))
        out: list[float | None] = []
        for i, ids in enumerate(completion_ids):
            found = _TARGET.search(prompts[i]) if prompts else None
            n_gold = int(found.group(1)) if found else self.target
            if n_gold is None:
                out.append(None)
                continue
            gap = n_gold - len(ids)
            if self.mode == "exact":
                out.append(float(correct[i]) - self.alpha * abs(gap))
            else:
                out.append(float(correct[i]) * min(max(self.alpha * gap + self.delta, 0.0), 1.0))
        return out


_LEVEL = re.compile(r"\b(short|medium|long)\b (?:reasoning|answer|thinking)", re.IGNORECASE)


@register_reward("tldr_length")
class TLDRLength:
    """TLDR-style multi-level length regularisation (seed paper arXiv 2505.07961: length-regularised GRPO with
    short / medium / long control). The level of an item comes from its ``length_level`` column, else from the
    prompt ("short reasoning", "medium answer", "long thinking"), else ``default_level``; each level has a token
    budget B. r = 1[correct] * (1 - min(1, alpha * max(0, L - B) / B)): full credit within the budget, linearly
    less beyond it, nothing for a wrong answer. The paper's exact reward is not confirmed (docs/METHODS.md §4/§6);
    this is the formula we implement and test.
    """

    def __init__(
        self, budgets: dict[str, int] | None = None, alpha: float = 1.0, default_level: str = "medium",
        extract: ExtractMode = "auto",
    ) -> None:
        self.budgets = {"short": 256, "medium": 1024, "long": 4096} | (budgets or {})
        if default_level not in self.budgets:
            raise ValueError(f"tldr_length: default_level {default_level!r} not in budgets {sorted(self.budgets)}")
        if any(b <= 0 for b in self.budgets.values()):
            raise ValueError(f"tldr_length: budgets must be positive, got {self.budgets}")
        self.alpha, self.default_level, self.grader = alpha, default_level, MathGrader(extract)

    def level(self, prompt: str | None, column: str | None) -> str:
        if column:
            if column not in self.budgets:
                raise ValueError(f"tldr_length: unknown length_level {column!r}; known {sorted(self.budgets)}")
            return column
        found = _LEVEL.search(prompt or "")
        return found.group(1).lower() if found else self.default_level

    def __call__(
        self, completions: list[str], completion_ids: list[list[int]], answer: list[Any] | None = None,
        prompts: list[str] | None = None, length_level: list[str] | None = None, correct: Verdicts = None,
        **kwargs: Any,
    ) -> list[float]:
        correct = correct_or_grade(self.grader, completions, correct, answer=answer, question=kwargs.get("question"))
        out = []
        for i, ids in enumerate(completion_ids):
            budget = self.budgets[self.level(prompts[i] if prompts else None, length_level[i] if length_level else None)]
            over = max(0, len(ids) - budget) / budget
            out.append(float(correct[i]) * (1.0 - min(1.0, self.alpha * over)))
        return out
