"""Progress lines of a running evaluation: problems done / total, pass@1 so far, tokens/s, ETA.

    progress = EvalProgress("math500", total=500, done_samples=resumed)
    progress.update(problems=64, samples=graded)   # logs "math500: 64/500 problems, pass@1 so far 31.2%, ..."

One line per finished chunk, so a long evaluation is never silent (a newcomer took 10 silent minutes for a hang).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

log = logging.getLogger("rl_small.eval")


class EvalProgress:
    """Counts problems, correct samples and generated tokens; pass@1 includes the resumed samples, the rate and
    the ETA only this run's work."""

    def __init__(self, name: str, total: int, done_samples: list[dict[str, Any]] | None = None) -> None:
        done_samples = done_samples or []
        self.name, self.total = name, total
        self.done = len({s["id"] for s in done_samples})
        self.samples, self.correct = len(done_samples), sum(bool(s["correct"]) for s in done_samples)
        self.tokens, self.new, self.t0 = 0, 0, time.perf_counter()

    def update(self, problems: int, samples: list[dict[str, Any]]) -> str:
        """Account for a finished chunk and log its line (returned too)."""
        self.done += problems
        self.new += problems
        self.samples += len(samples)
        self.correct += sum(bool(s["correct"]) for s in samples)
        self.tokens += sum(int(s.get("tokens", 0)) for s in samples)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        eta = elapsed / self.new * (self.total - self.done) if self.new else float("nan")
        line = (f"{self.name}: {self.done}/{self.total} problems, pass@1 so far "
                f"{100 * self.correct / max(self.samples, 1):.1f}%, {self.tokens / elapsed:.0f} tok/s, "
                f"ETA {_duration(eta)}")
        log.info(line)
        return line


def _duration(seconds: float) -> str:
    if math.isnan(seconds):  # nothing generated yet
        return "?"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
