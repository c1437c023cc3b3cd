"""Format rewards: did the completion state its answer the way the template asked?

- ``boxed_format``: 1.0 when the completion contains exactly one closed ``\\boxed{...}`` that is not empty.
- ``think_answer_format``: 1.0 for ``<think>...</think>`` followed by ``<answer>...</answer>`` and nothing
  else (R1 style); set ``think_tag``/``answer_tag`` for other tags (Memory-R's ``reasoning``/``answer``).
"""

from __future__ import annotations

import re
from typing import Any

from rewards.base import register_reward
from rewards.math import last_boxed


@register_reward("boxed_format")
def boxed_format(completions: list[str], **kwargs: Any) -> list[float]:
    """1.0 for exactly one non-empty closed \\boxed{}, else 0.0 (several boxes are a hedge, not a format)."""
    out = []
    for c in completions:
        n = len(re.findall(r"\\boxed\s*\{", c))
        box = last_boxed(c)
        out.append(1.0 if n == 1 and box else 0.0)
    return out


@register_reward("think_answer_format")
class ThinkAnswerFormat:
    """1.0 when the completion is ``<think>…</think>`` then ``<answer>…</answer>`` (whitespace allowed)."""

    def __init__(self, think_tag: str = "think", answer_tag: str = "answer") -> None:
        t, a = re.escape(think_tag), re.escape(answer_tag)
        self.pattern = re.compile(rf"^\s*<{t}>(?:(?!<{t}>).)+?</{t}>\s*<{a}>(?:(?!<{a}>).)+?</{a}>\s*$", re.DOTALL)

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        return [1.0 if self.pattern.match(c) else 0.0 for c in completions]
