"""Held-out evaluation: greedy accuracy of a policy on a task split.

    result = evaluate(backend, prompts, grader, max_new_tokens=64)   # EvalResult(accuracy, ...)

``grader`` is a reward with the ``math_accuracy`` contract (1.0 correct / 0.0 wrong); it receives every
dataset column of the prompts; a progress line is logged after each chunk. Benchmarks, sampled pass@k and
reports come in ``rl-small eval`` (rl_small/eval/run.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rl_small.rollout.base import RolloutBackend, SamplingSpec
from rl_small.types import Prompt, batch_columns


@dataclass
class EvalResult:
    """Greedy accuracy on ``n`` problems, mean completion length, share truncated at max_new_tokens."""

    accuracy: float
    n: int
    len_mean: float
    truncated: float
    samples: list[dict[str, Any]]


def evaluate(backend: RolloutBackend, prompts: list[Prompt], grader: Any, max_new_tokens: int,
             name: str = "held-out", chunk: int = 64) -> EvalResult:
    """Generate one greedy completion per prompt and grade it against the prompt's answer, ``chunk`` prompts at
    a time with a progress line after each (problems done, accuracy so far, tokens/s, ETA)."""
    from rl_small.eval.progress import EvalProgress

    spec = SamplingSpec(n=1, max_new_tokens=max_new_tokens, temperature=0.0)
    progress = EvalProgress(name, len(prompts))
    rollouts: list[Any] = []
    scores: list[Any] = []
    for i in range(0, len(prompts), max(chunk, 1)):
        part = backend.generate(prompts[i : i + max(chunk, 1)], spec)
        # every dataset column, as in training (code graders need test / entry_point ...)
        part_scores = grader([r.text for r in part], **batch_columns(part))
        rollouts += part
        scores += part_scores
        progress.update(len(part), [{"id": r.prompt.id, "correct": bool(s), "tokens": len(r.completion_ids)}
                                    for r, s in zip(part, part_scores)])
    n = len(rollouts)
    samples = [
        {"id": r.prompt.id, "answer": r.prompt.answer, "completion": r.text, "correct": bool(s),
         "tokens": len(r.completion_ids)}
        for r, s in zip(rollouts, scores)
    ]
    return EvalResult(
        accuracy=sum(float(s or 0) for s in scores) / max(n, 1),
        n=n,
        len_mean=sum(len(r.completion_ids) for r in rollouts) / max(n, 1),
        truncated=sum(r.truncated for r in rollouts) / max(n, 1),
        samples=samples,
    )


def paired(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, int]:
    """Problem-by-problem comparison of two evaluations of the same problems (matched by ``id``): how many each
    solved alone, both, neither; a change in accuracy is real when ``after_only`` and ``before_only`` differ by
    more than noise (McNemar's test uses exactly these two counts)."""
    was = {s["id"]: bool(s["correct"]) for s in before}
    now = {s["id"]: bool(s["correct"]) for s in after}
    common = [i for i in now if i in was]
    return {
        "problems": len(common),
        "both": sum(was[i] and now[i] for i in common),
        "before_only": sum(was[i] and not now[i] for i in common),
        "after_only": sum(now[i] and not was[i] for i in common),
        "neither": sum(not was[i] and not now[i] for i in common),
    }


def read_samples(path: Any) -> list[dict[str, Any]]:
    """The sample records of an ``eval_*.jsonl`` file (a torn last line is skipped); [] when absent."""
    import json
    from pathlib import Path

    out = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out
