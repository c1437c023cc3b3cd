"""Evaluation statistics: unbiased pass@k (Chen et al. 2021, arXiv 2107.03374) and maj@k.

    pass_at_k(n=16, c=4, k=1)        -> 0.25
    majority_vote(["4", "4.0", "5"])  -> "4"   (answers grouped by math equivalence)
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the probability that at least one of k samples drawn without replacement
    from n (c of them correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer (equivalent answers count together; ties go to the earliest); None if none."""
    from rewards.math import is_equivalent

    groups: list[tuple[str, int]] = []
    for a in answers:
        if a is None or not a.strip():
            continue
        for i, (rep, count) in enumerate(groups):
            if is_equivalent(a, rep):
                groups[i] = (rep, count + 1)
                break
        else:
            groups.append((a, 1))
    if not groups:
        return None
    best = max(range(len(groups)), key=lambda i: (groups[i][1], -i))
    return groups[best][0]
