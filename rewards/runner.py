"""Running one reward component: TRL's call convention, a deadline, counters, the failure limit.

``RewardComponent(name, fn, weight, timeout_s, ...)`` calls ``fn`` the way TRL's ``GRPOTrainer`` calls a
reward (everything by keyword: ``prompts``, ``completions``, ``completion_ids``, ``trainer_state``,
``log_metric``, ``log_extra``, the dataset columns), under a deadline that reward code cannot cancel
(``rewards.deadline``). A call that raises, overruns or returns a bad value abstains for the batch and is
counted; ``max_consecutive_failures`` failed calls in a row set ``stop`` (a RewardError the combination
raises). A reward with a ``grader`` gets the batch's shared ``correct`` column (``rewards.graded``).
``rewards.base`` re-exports everything here; ``CombinedReward`` (there) sums the components.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.deadline import RewardTimeout, deadline
from rewards.graded import GradedBatch

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float | None]]


class RewardError(RuntimeError):
    """A reward failed on every one of its last K calls: the run stops (``rl-small: error: ...``)."""


class RewardConfigError(ValueError):
    """A reward cannot run on the sample batch checked when the run is built."""



@dataclass
class TrainerState:
    """What TRL passes rewards as ``trainer_state`` (the fields of transformers' TrainerState they read)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


def is_conversational_prompts(prompts: Any) -> bool:
    """TRL's rule: a prompt that is a list of ``{"role", "content"}`` messages is conversational."""
    return (isinstance(prompts, list) and bool(prompts)
            and all(isinstance(p, list) and p and all(isinstance(m, dict) and "role" in m for m in p)
                    for p in prompts))


def _as_scores(name: str, out: Any, n: int) -> list[float | None]:
    """The reward's output as floats / None, or ValueError naming the reward and the bad value."""
    if out is None or isinstance(out, (str, bytes, dict)) or not hasattr(out, "__iter__"):
        raise ValueError(f"reward {name!r} returned {out!r} ({type(out).__name__}), not a list of {n} scores")
    out = list(out)
    if len(out) != n:
        raise ValueError(f"reward {name!r} returned {len(out)} scores for {n} completions: {out[:8]!r}")
    scores: list[float | None] = []
    for i, v in enumerate(out):
        if v is None:
            scores.append(None)
        elif isinstance(v, numbers.Real) or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0):
            scores.append(float(v))
        else:
            raise ValueError(f"reward {name!r} returned {v!r} ({type(v).__name__}) at index {i}, not a number")
    return scores


@dataclass
class RewardComponent:
    """One weighted reward of a run, with its own deadline and counters.

    ``conversational``: completions as ``[{"role": "assistant", "content": text}]`` and prompts as messages
    (TRL's conversational format); None decides from the batch as TRL does (a ``prompt`` column of message
    lists), except for rl-small's own registered rewards (``native``), which always take text.
    """

    name: str
    fn: RewardFn
    weight: float = 1.0
    timeout_s: float = 10.0
    conversational: bool | None = None
    columns: dict[str, str] = field(default_factory=dict)  # alias -> e.g. {"answer": "solution"}
    max_consecutive_failures: int = 3  # 0: never stop the run
    native: bool = False
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    abstained: int = 0
    nonfinite: int = 0
    failed_in_a_row: int = 0
    stop: RewardError | None = None  # set when it reached max_consecutive_failures; CombinedReward raises it
    logged: dict[str, list[float]] = field(default_factory=dict)  # log_metric(name, value) of the last call
    extra: dict[str, list[Any]] = field(default_factory=dict)  # log_extra(column, values) of the last call

    def _kwargs(self, completions: list[str], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keywords of one call, as GRPOTrainer builds them (columns, then the reserved names)."""
        kw = dict(kwargs)
        for src, alias in self.columns.items():
            if src not in kw:
                raise KeyError(f"reward {self.name!r}: column {src!r} (aliased as {alias!r}) is not in the batch; "
                               f"present: {sorted(kw)}")
            kw[alias] = kw[src]
        step = kw.get("step", 0)
        kw.setdefault("trainer_state", TrainerState(step if isinstance(step, int) else 0))
        self.logged, self.extra = {}, {}
        kw["log_metric"] = lambda key, value: self.logged.setdefault(key, []).append(float(value))
        kw["log_extra"] = lambda column, values: self.extra.setdefault(column, []).extend(values)
        if self.native:
            kw["completions"] = list(completions)
            return kw
        raw_prompts = kw.pop("prompt", None)  # TRL passes the dataset's prompt column as ``prompts``
        conv = self.conversational if self.conversational is not None else is_conversational_prompts(raw_prompts)
        if raw_prompts is not None and (conv or not is_conversational_prompts(raw_prompts)):
            kw["prompts"] = raw_prompts
        kw["completions"] = [[{"role": "assistant", "content": c}] for c in completions] if conv else list(completions)
        return kw

    def _accepted(self, kw: dict[str, Any]) -> dict[str, Any]:
        """All keywords for a reward with ``**kwargs`` (as TRL); only the named ones for one without."""
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            return kw
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return kw
        return {k: v for k, v in kw.items() if k in params}

    def run(self, completions: list[str], graded: GradedBatch | None = None, /, **kwargs: Any) -> list[float | None]:
        """One call under the deadline: scores, or RewardTimeout / the reward's exception / ValueError. A reward
        with a ``grader`` gets ``correct=`` from ``graded`` (graded here, under this deadline, when it is the
        first of the batch to need that grading); without ``graded`` it grades the batch itself."""
        kw = self._kwargs(completions, kwargs)
        grader = getattr(self.fn, "grader", None)
        with deadline(self.timeout_s) as d:
            if grader is not None and graded is not None:
                kw["correct"] = graded.correct(grader, completions, kw)
            out = self.fn(**self._accepted(kw))
        if d is not None and d.fired:  # it overran but caught our RewardTimeout itself
            raise RewardTimeout(f"exceeded {self.timeout_s:g}s")
        return _as_scores(self.name, out, len(completions))

    def __call__(self, completions: list[str], graded: GradedBatch | None = None, /, **kwargs: Any
                 ) -> list[float | None]:
        """Scores of one batch; a failure abstains for the batch and is counted; K in a row set ``stop`` (the
        RewardError that CombinedReward raises once every component has scored the batch). ``graded``: the
        batch's shared ``correct`` columns (positional only: a dataset column may be named ``graded``)."""
        self.calls += 1
        n = len(completions)
        try:
            scores = self.run(completions, graded, **kwargs)
        except RewardTimeout:
            self.timeouts += 1
            log.warning("reward %r timed out after %gs; it abstains for this batch", self.name, self.timeout_s)
            return self._failed(n, RewardTimeout(f"timed out after {self.timeout_s:g}s"))
        except Exception as err:  # noqa: BLE001 (a user's reward must not kill the run on one bad batch)
            self.errors += 1
            log.warning("reward %r raised %s: %s; it abstains for this batch", self.name, type(err).__name__, err)
            return self._failed(n, err)
        self.failed_in_a_row = 0
        bad = [i for i, v in enumerate(scores) if v is not None and not math.isfinite(v)]
        for i in bad:  # NaN / inf are errors of this component for those items, never numbers
            scores[i] = None
        if bad:
            self.nonfinite += len(bad)
            log.warning("reward %r returned %d non-finite values; they abstain", self.name, len(bad))
        self.abstained += sum(v is None for v in scores)
        return scores

    def _failed(self, n: int, err: BaseException) -> list[float | None]:
        self.failed_in_a_row += 1
        self.abstained += n
        k = self.max_consecutive_failures
        if k and self.failed_in_a_row >= k and self.stop is None:
            first = " (every call so far)" if self.failed_in_a_row == self.calls else ""
            self.stop = RewardError(f"reward {self.name!r} failed {self.failed_in_a_row} calls in a row{first}, "
                                    f"last with {type(err).__name__}: {err} (rewards[].max_consecutive_failures="
                                    f"{k})")
            self.stop.__cause__ = err
        return [None] * n

    def check(self, completions: list[str], graded: GradedBatch | None = None, /, **kwargs: Any) -> None:
        """Run once on a sample batch, leaving counters and state as they were; RewardConfigError if it cannot
        run. A reward that needs the policy bound first (``bind_policy``, and ``needs_policy`` true or absent)
        is not checked; a timeout only warns."""
        if hasattr(self.fn, "bind_policy") and getattr(self.fn, "needs_policy", True):
            return
        stateful = hasattr(self.fn, "state_dict") and hasattr(self.fn, "load_state_dict")
        state = self.fn.state_dict() if stateful else None  # type: ignore[attr-defined]
        try:
            self.run(completions, graded, **kwargs)
        except RewardTimeout:
            log.warning("reward %r did not finish a %d-item sample batch in %gs", self.name, len(completions),
                        self.timeout_s)
        except Exception as err:
            raise RewardConfigError(f"reward {self.name!r} fails on a sample batch: {type(err).__name__}: {err}") \
                from err
        finally:
            if state is not None:
                self.fn.load_state_dict(state)  # type: ignore[attr-defined]
            if hasattr(self.fn, "metrics"):
                self.fn.metrics()
            self.logged, self.extra = {}, {}

    def own_metrics(self) -> dict[str, float]:
        """The reward's ``metrics()`` and ``log_metric`` values of the last call, under ``reward/<name>/``
        (a key already namespaced, such as ``memory/anneal``, is kept as is)."""
        got = dict(self.fn.metrics()) if hasattr(self.fn, "metrics") else {}
        got |= {k: sum(v) / len(v) for k, v in self.logged.items() if v}
        return {k if "/" in k else f"reward/{self.name}/{k}": float(v) for k, v in got.items()}

    def state_dict(self) -> dict[str, Any]:
        fn_state = self.fn.state_dict() if hasattr(self.fn, "state_dict") else None
        counters = {k: getattr(self, k) for k in ("calls", "errors", "timeouts", "abstained", "nonfinite",
                                                  "failed_in_a_row")}  # a resume keeps counting failures in a row
        return {"counters": counters, "fn": fn_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters and the reward's state; a counter missing from an older checkpoint keeps its value."""
        for k, v in state["counters"].items():
            setattr(self, k, v)
        if state.get("fn") is not None and hasattr(self.fn, "load_state_dict"):
            self.fn.load_state_dict(state["fn"])

