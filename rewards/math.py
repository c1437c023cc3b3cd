"""Math answer extraction and equivalence, and the ``math_accuracy`` reward.

    extract_answer("so \\boxed{3/4}", mode="boxed")  -> "3/4"
    is_equivalent("0.75", "3/4")                      -> True
    math_accuracy(["... \\boxed{12}"], answer=["12"]) -> [1.0]

Extraction modes: ``boxed`` (last \\boxed{...}, nested braces kept), ``gsm8k`` (text after the last "####"),
``last_number`` (last number in the text), ``auto`` (boxed, else ####, else last number).
Equivalence: exact numeric comparison first (commas, units and trailing ".0" tolerated), then math-verify
``verify(parse(gold), parse(pred))`` (gold first, as the community does), each under a deadline so a
pathological expression cannot hang the run.
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction
from typing import Any, Literal

from rewards.base import RewardTimeout, deadline, register_reward

log = logging.getLogger(__name__)
# We call math-verify with its own SIGALRM timeouts off (they would cancel ours, see rewards.base.deadline)
# and it warns about that on every call.
logging.getLogger("math_verify").setLevel(logging.ERROR)

ExtractMode = Literal["boxed", "gsm8k", "last_number", "auto"]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_MAX_ANSWER_CHARS = 200  # a "final answer" longer than this is not an answer (reward-hacking guard)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None when absent/unclosed."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start : i - 1].strip()
    return None


def all_boxed(text: str) -> list[str]:
    """Contents of every balanced ``\\boxed{...}`` / ``\\fbox{...}``, in order."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1].strip())
    return out


def _last_number(text: str) -> str | None:
    nums = _NUMBER.findall(text)
    return nums[-1].replace(",", "") if nums else None


def extract_answer(text: str, mode: ExtractMode = "auto") -> str | None:
    """The final answer of a completion under ``mode``, or None when there is none."""
    if mode not in ("boxed", "gsm8k", "last_number", "auto"):
        raise ValueError(f"unknown extraction mode {mode!r}")
    ans: str | None = None
    if mode in ("boxed", "auto"):
        ans = last_boxed(text)
    if ans is None and mode in ("gsm8k", "auto") and "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        ans = tail.splitlines()[0].strip() if tail else None
    if ans is None and mode in ("last_number", "auto"):
        ans = _last_number(text)
    if ans is not None and (not ans.strip() or len(ans) > _MAX_ANSWER_CHARS):
        return None
    return ans


def _as_number(s: str) -> Fraction | None:
    """Parse '1,234', '-3', '2.50', '3/4', '$12', '12 apples', '\\frac{3}{4}' as an exact number."""
    t = s.strip().strip("$").replace("\\!", "").replace("{,}", "").replace(",", "")
    t = re.sub(r"\\(?:text|mathrm)\{[^{}]*\}", "", t)
    t = re.sub(r"^\\d?frac\{(-?\d+)\}\{(\d+)\}$", r"\1/\2", t.strip())
    t = re.sub(r"\s*(?:[a-zA-Z%°]+\.?\s*)+$", "", t).strip().rstrip(".")  # trailing units: "12 apples"
    t = t.lstrip("\\$").strip()
    if not re.fullmatch(r"-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+", t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def is_equivalent(pred: str | None, gold: str, timeout_s: float = 5.0) -> bool:
    """True when ``pred`` denotes the same value as ``gold``; False for None/empty/garbage."""
    if pred is None or not pred.strip():
        return False
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:
        return a == b
    if pred.strip() == gold.strip():
        return True
    from math_verify import parse, verify

    try:
        with deadline(timeout_s):
            g = parse(_boxed(gold), parsing_timeout=None)
            p = parse(_boxed(pred), parsing_timeout=None)
            return bool(g and p and verify(g, p, timeout_seconds=None))
    except RewardTimeout:
        log.warning("math-verify timed out on pred=%r gold=%r", pred[:80], gold[:80])
        return False


def is_correct(
    completion: str, gold: str, mode: ExtractMode = "auto", question: str | None = None, timeout_s: float = 5.0
) -> bool:
    """Grade a completion against ``gold`` with reward-hacking guards:

    - a copy of the question inside the completion is removed before extraction (its numbers are not answers);
    - hedging: several boxed answers that are not all equivalent to the final one give no credit;
    - an answer longer than 200 characters (a huge number, a dump) is no answer (see ``extract_answer``).
    """
    text = completion
    words = question.split() if question else []
    if len("".join(words)) >= 8:  # the question, whatever its whitespace, is cut out
        text = re.sub(r"\s+".join(map(re.escape, words)), " ", text)
    boxed = list(dict.fromkeys(all_boxed(text)))
    if len(boxed) > 1 and not all(is_equivalent(b, boxed[-1], timeout_s) for b in boxed[:-1]):
        return False
    return is_equivalent(extract_answer(text, mode), str(gold), timeout_s)


def _boxed(s: str) -> str:
    return s if "\\boxed" in s else f"\\boxed{{{s}}}"


@register_reward("math_accuracy")
class MathAccuracy:
    """1.0 when the extracted final answer equals the gold ``answer`` column, else 0.0 (``is_correct``: copies
    of the ``question`` column and hedged multi-answers earn nothing).

    Args:
        extract: extraction mode (see module docstring).
        item_timeout_s: deadline for one equivalence check.
    """

    def __init__(self, extract: ExtractMode = "auto", item_timeout_s: float = 2.0) -> None:
        if extract not in ("boxed", "gsm8k", "last_number", "auto"):
            raise ValueError(f"math_accuracy: unknown extract mode {extract!r}")
        self.extract = extract
        self.item_timeout_s = item_timeout_s

    def __call__(
        self, completions: list[str], answer: list[str], question: list[str] | None = None, **kwargs: Any
    ) -> list[float]:
        qs = question or [None] * len(completions)
        return [
            float(is_correct(c, str(g), self.extract, q, self.item_timeout_s))
            for c, g, q in zip(completions, answer, qs, strict=True)
        ]
