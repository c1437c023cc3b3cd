"""Grade once: the ``correct`` column shared by every reward of a batch that needs correctness.

A reward that needs to know which completions are correct (``math_accuracy`` itself, the length penalties,
the episodic memory) names the grader it would use in a ``grader`` attribute and takes a ``correct`` keyword::

    class MyPenalty:
        def __init__(self, extract: str = "auto") -> None:
            self.grader = MathGrader(extract)  # rewards.math
        def __call__(self, completions, correct=None, **kwargs):
            correct = correct if correct is not None else self.grader(completions, **kwargs)  # called alone
            ...

``CombinedReward`` grades a batch once per distinct verdict (``grader.key``, e.g. ``("math", "auto")``, on
the same ``grader.columns``): when the first component that declares such a grader runs, under that
component's deadline (a failure or timeout there is that component's, and the next one grades again), and
passes the column as ``correct=`` (``list[bool | None]``, None: the grader has no verdict for that item) to
every component whose grader has that key. Only components with a ``grader`` get the keyword, so TRL-style
functions are called exactly as before; a component called alone (a test, TRL's trainer) grades itself.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Protocol


class Grader(Protocol):
    """Correctness of each completion of a batch. Graders with equal ``key`` give equal verdicts on the same
    completions and ``columns``; execution settings (deadlines, workers) are not part of the key."""

    @property
    def key(self) -> Hashable: ...

    @property
    def columns(self) -> tuple[str, ...]: ...  # the batch columns it reads, e.g. ("answer", "question")

    def __call__(self, completions: list[str], **columns: Any) -> Sequence[bool | None]: ...


class GradedBatch:
    """The ``correct`` columns of one batch, graded on first request; ``gradings`` counts grader calls."""

    def __init__(self) -> None:
        self._done: dict[Hashable, tuple[list[Any], list[bool | None]]] = {}
        self.gradings = 0

    def correct(self, grader: Grader, completions: list[str], kwargs: dict[str, Any]) -> list[bool | None]:
        """``grader``'s verdicts on ``completions`` with the columns of ``kwargs`` (one component's keywords:
        a component whose ``columns`` alias another column into ``answer`` gets its own grading)."""
        cols = [kwargs.get(c) for c in grader.columns]
        key = (grader.key, *map(id, cols))  # the column objects are kept below, so an id is never reused
        if key not in self._done:
            out = list(grader(completions, **dict(zip(grader.columns, cols))))
            if len(out) != len(completions):
                raise ValueError(f"grader {grader.key!r} returned {len(out)} verdicts for {len(completions)} "
                                 "completions")
            self.gradings += 1
            self._done[key] = (cols, out)
        return list(self._done[key][1])


def correct_or_grade(grader: Grader, completions: list[str], correct: Sequence[bool | None] | None,
                     **columns: Any) -> Sequence[bool | None]:
    """The shared ``correct`` column a reward was given, or ``grader``'s verdicts when it is called alone."""
    return correct if correct is not None else grader(completions, **columns)
