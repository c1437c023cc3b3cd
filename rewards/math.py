"""Math answer extraction and equivalence, and the ``math_accuracy`` reward.

    extract_answer("so \\boxed{3/4}", mode="boxed")  -> "3/4"
    is_equivalent("0.75", "3/4")                      -> True
    math_accuracy(["... \\boxed{12}"], answer=["12"]) -> [1.0]

Extraction modes: ``boxed`` (last \\boxed{...}, nested braces kept), ``gsm8k`` (text after the last "####"),
``last_number`` (last number in the text), ``auto`` (boxed, else ####, else last number).
Equivalence: a fast path in this process (exact numbers, with commas, units, "$", trailing ".0", fractions and
scientific notation ``4.5e33`` / ``4.5 \\times 10^{33}`` tolerated; identical strings), microseconds per item;
everything else goes to math-verify ``verify(parse(gold), parse(pred))`` in a pool of worker processes
(``rewards.math_grader``) where each item has its own wall-clock deadline: an item that overruns scores 0 and
is counted (``metrics()``: ``item_timeouts``), its worker is killed and replaced, the rest of the batch is
graded normally. A batch of n items that need math-verify takes at most about ceil(n / workers) x deadline.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Literal

from rewards.base import register_reward
from rewards.math_grader import Pair, shared_pool

log = logging.getLogger(__name__)

ExtractMode = Literal["boxed", "gsm8k", "last_number", "auto"]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_MAX_ANSWER_CHARS = 200  # a "final answer" longer than this is not an answer (reward-hacking guard)
# Units stripped from a number: a word of 2+ letters after a space ("12 apples", "3 hours"), or a unit from this
# list written right after the digits ("5cm", "30%"). A single letter is never a unit: in "2n" or "3k" it is a
# variable of the answer, and "2n" is not the number 2.
_ATTACHED_UNITS = r"%|°|cm|mm|km|kg|mg|ml|mph|kph|ft|hrs?|mins?|secs?|lbs?|oz|yds?"
_NOT_UNITS = {"pi", "sqrt", "log", "ln", "sin", "cos", "tan", "exp"}
_SCI = re.compile(r"(-?\d+(?:\.\d+)?)(?:[eE]|\s*(?:\\times|\\cdot|×|\*)\s*10\s*\^)\s*\{?\s*([+-]?\d+)\s*\}?")
_MAX_EXPONENT = 1000  # 10**1000 is still exact and cheap; beyond that leave it to math-verify


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


def _strip_units(t: str) -> str:
    """'12 apples' -> '12', '5cm' -> '5', '30%' -> '30'; '2n', '3 k', '2 pi' are left alone."""
    while True:
        m = re.search(r"\s+([a-zA-Z]{2,})\.?$", t)
        if m and m.group(1).lower() not in _NOT_UNITS:
            t = t[: m.start()]
            continue
        m = re.search(rf"(?<=[\d.])\s*(?:{_ATTACHED_UNITS})\.?$", t)
        if m:
            t = t[: m.start()]
            continue
        return t.strip()


def _as_number(s: str) -> Fraction | None:
    """Parse '1,234', '-3', '2.50', '3/4', '$12', '12 apples', '\\frac{3}{4}', '4.5e33', '4.5 \\times 10^{33}'
    as an exact number; None for anything else ('2n', 'x+1', ...)."""
    t = s.strip().strip("$").replace("\\!", "").replace("{,}", "").replace(",", "").replace("\\%", "%")
    t = re.sub(r"\\(?:text|mathrm)\{[^{}]*\}", "", t)
    t = re.sub(r"^\\d?frac\{(-?\d+)\}\{(\d+)\}$", r"\1/\2", t.strip())
    t = _strip_units(t).rstrip(".").lstrip("\\$").strip()
    try:
        if re.fullmatch(r"-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+", t):
            return Fraction(t)
        m = _SCI.fullmatch(t)
        if m and abs(int(m.group(2))) <= _MAX_EXPONENT:
            return Fraction(m.group(1)) * Fraction(10) ** int(m.group(2))
    except (ValueError, ZeroDivisionError):
        return None
    return None


def fast_equivalent(pred: str | None, gold: str) -> bool | None:
    """The in-process verdict: True / False when exact numbers or identical strings decide it, None when only
    math-verify can (then ``is_equivalent`` sends it to the worker pool)."""
    if pred is None or not pred.strip():
        return False
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:
        return a == b
    if pred.strip() == gold.strip():
        return True
    return None


def is_equivalent(pred: str | None, gold: str, timeout_s: float = 5.0, workers: int | None = None) -> bool:
    """True when ``pred`` denotes the same value as ``gold``; False for None/empty/garbage and when math-verify
    overruns ``timeout_s`` (in a worker process, so the caller is never blocked longer)."""
    fast = fast_equivalent(pred, gold)
    if fast is not None:
        return fast
    assert pred is not None
    out = shared_pool(workers).run([[(pred, gold)]], timeout_s)[0]
    return bool(out and out[0])


@functools.lru_cache(maxsize=256)
def _question_pattern(question: str) -> re.Pattern[str]:
    return re.compile(r"\s+".join(map(re.escape, question.split())))


def strip_question(text: str, question: str | None) -> str:
    """Cut copies of ``question`` (whatever their whitespace) out of ``text``: their numbers are not answers.

    The regex over the question's words costs milliseconds to build for a long problem, so it runs only when
    the question, whitespace removed, occurs in the text whitespace removed (a necessary condition, O(n))."""
    words = question.split() if question else []
    squeezed = "".join(words)
    if len(squeezed) < 8 or squeezed not in "".join(text.split()):
        return text
    return _question_pattern(" ".join(words)).sub(" ", text)


def _item_pairs(completion: str, gold: str, mode: ExtractMode, question: str | None) -> tuple[bool | None, list[Pair]]:
    """Grade one completion as far as the fast path can: (verdict, []) when decided, else (None, the
    (pred, gold) pairs math-verify must find all equivalent for the item to be correct)."""
    text = strip_question(completion, question)
    boxed = list(dict.fromkeys(all_boxed(text)))
    pairs = [(b, boxed[-1]) for b in boxed[:-1]] if len(boxed) > 1 else []  # hedging: all must agree
    final = extract_answer(text, mode)
    if final is None:
        return False, []
    pairs.append((final, gold))
    undecided = []
    for p, g in pairs:
        verdict = fast_equivalent(p, g)
        if verdict is False:
            return False, []
        if verdict is None:
            undecided.append((p, g))
    return (True, []) if not undecided else (None, undecided)


def grade_batch(
    completions: Sequence[str], golds: Sequence[str], mode: ExtractMode = "auto",
    questions: Sequence[str | None] | None = None, timeout_s: float = 5.0, workers: int | None = None,
) -> list[tuple[bool, str]]:
    """Grade a batch with ``is_correct``'s guards: per item (correct, how), ``how`` one of ``fast`` (decided
    in-process), ``verified`` (math-verify in a worker), ``timeout`` (overran ``timeout_s``: not correct)."""
    qs = questions if questions is not None else [None] * len(completions)
    out: list[tuple[bool, str]] = []
    slow: list[int] = []
    jobs: list[list[Pair]] = []
    for i, (c, g, q) in enumerate(zip(completions, golds, qs, strict=True)):
        verdict, pairs = _item_pairs(c, str(g), mode, q)
        out.append((bool(verdict), "fast"))
        if verdict is None:
            slow.append(i)
            jobs.append(pairs)
    if jobs:
        for i, res in zip(slow, shared_pool(workers).run(jobs, timeout_s)):
            out[i] = (False, "timeout") if res is None else (all(res), "verified")
    return out


def is_correct(
    completion: str, gold: str, mode: ExtractMode = "auto", question: str | None = None, timeout_s: float = 5.0
) -> bool:
    """Grade a completion against ``gold`` with reward-hacking guards:

    - a copy of the question inside the completion is removed before extraction (its numbers are not answers);
    - hedging: several boxed answers that are not all equivalent to the final one give no credit;
    - an answer longer than 200 characters (a huge number, a dump) is no answer (see ``extract_answer``).
    """
    return grade_batch([completion], [gold], mode, [question], timeout_s)[0][0]


class MathGrader:
    """The math verdict of each completion (``grade_batch``: the fast path, else math-verify in the worker
    pool), as a grader (``rewards.graded``): rewards that need correctness share one grading per batch.

    Args:
        extract: extraction mode (see module docstring); graders with the same mode give the same verdicts.
        item_timeout_s: wall-clock deadline of one item's math-verify work; an item past it is not correct.
        workers: grader processes (default min(2, CPUs)).
    """

    columns = ("answer", "question")

    def __init__(self, extract: ExtractMode = "auto", item_timeout_s: float = 2.0, workers: int | None = None) -> None:
        if extract not in ("boxed", "gsm8k", "last_number", "auto"):
            raise ValueError(f"unknown extract mode {extract!r}")
        if not item_timeout_s > 0:
            raise ValueError(f"item_timeout_s must be > 0, got {item_timeout_s!r}")
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        self.extract, self.item_timeout_s, self.workers = extract, item_timeout_s, workers
        self.counts = {"item_timeouts": 0, "items_verified": 0, "grader_restarts": 0}

    @property
    def key(self) -> tuple[str, str]:
        return ("math", self.extract)

    def __call__(
        self, completions: Sequence[str], answer: Sequence[Any] | None = None,
        question: Sequence[str | None] | None = None, **kwargs: Any,
    ) -> list[bool]:
        if answer is None:
            raise ValueError("grading needs the 'answer' column to know which completions are correct")
        pool = shared_pool(self.workers)
        restarts = pool.restarts
        graded = grade_batch(completions, [str(a) for a in answer], self.extract, question, self.item_timeout_s,
                             self.workers)
        self.counts["item_timeouts"] += sum(how == "timeout" for _, how in graded)
        self.counts["items_verified"] += sum(how != "fast" for _, how in graded)
        self.counts["grader_restarts"] += pool.restarts - restarts
        return [ok for ok, _ in graded]

    def metrics(self) -> dict[str, float]:
        """Counts since the last call (then reset): items past their deadline, items that needed math-verify,
        grader processes killed and replaced."""
        out = {k: float(v) for k, v in self.counts.items()}
        self.counts = dict.fromkeys(self.counts, 0)
        return out


@register_reward("math_accuracy")
class MathAccuracy:
    """1.0 when the extracted final answer equals the gold ``answer`` column, else 0.0 (``is_correct``: copies
    of the ``question`` column and hedged multi-answers earn nothing). In a run it reads the batch's shared
    ``correct`` column (``rewards.graded``; graded by the first reward that needs it, this one when listed
    first); called alone it grades the batch itself.

    Args:
        extract: extraction mode (see module docstring).
        item_timeout_s: wall-clock deadline of one item's math-verify work; an item past it scores 0.0.
        workers: grader processes (default min(2, CPUs)); a batch of n slow items takes about
            ceil(n / workers) x item_timeout_s at most.
    """

    def __init__(self, extract: ExtractMode = "auto", item_timeout_s: float = 2.0, workers: int | None = None) -> None:
        try:
            self.grader = MathGrader(extract, item_timeout_s, workers)
        except ValueError as err:
            raise ValueError(f"math_accuracy: {err}") from None

    def __call__(
        self, completions: list[str], answer: list[str], question: list[str] | None = None,
        correct: Sequence[bool | None] | None = None, **kwargs: Any,
    ) -> list[float | None]:
        if correct is None:
            correct = self.grader(completions, answer=answer, question=question)
        return [None if ok is None else float(ok) for ok in correct]

    def metrics(self) -> dict[str, float]:
        """The grading counts of this reward's grader since the last call (``MathGrader.metrics``)."""
        return self.grader.metrics()
