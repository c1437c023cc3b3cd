"""Reward contract, registry, plugin loading, timeouts and the weighted combination.

A reward is a plain function or a picklable callable class following TRL's contract::

    @register_reward("my_reward")
    def my_reward(completions: list[str], **kwargs) -> list[float | None]: ...

``None`` means "no opinion": excluded from the weighted sum and counted. Keyword arguments carry the dataset
columns (``answer``, ...) and rollout fields (``prompts``, ``completion_ids``, ``group_id``, ``step``), so
TRL / open-r1 reward functions plug in unchanged. A reward named in a recipe is a registry name, a dotted
path ``pkg.module:attr`` or a file path ``path/to/file.py:attr``; extra recipe keys go to the constructor
of a class (or are bound as keyword arguments of a function).

``CombinedReward`` runs every component under a deadline; a component that raises or overruns abstains for
that batch and is counted (``reward/<name>/errors``, ``reward/<name>/timeouts``) — the run continues.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float | None]]
REWARD_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a reward function or class under ``name``; a second registration of a name is an error."""

    def wrap(obj: Callable[..., Any]) -> Callable[..., Any]:
        if name in REWARD_REGISTRY and REWARD_REGISTRY[name] is not obj:
            raise ValueError(f"reward name {name!r} is already registered by {REWARD_REGISTRY[name]!r}")
        REWARD_REGISTRY[name] = obj
        return obj

    return wrap


class RewardTimeout(BaseException):
    """Raised inside a reward that overran its deadline.

    A BaseException so that a reward's own ``except Exception`` (math-verify has one) cannot swallow it.
    """


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise RewardTimeout in the block after ``seconds`` (SIGALRM; nests; main thread only).

    Outside the main thread signals cannot be used and the block runs without a deadline.
    """
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_remaining, _ = signal.getitimer(signal.ITIMER_REAL)
    outer_handler = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    ours = seconds if not outer_remaining else min(seconds, outer_remaining)
    inner_fired = outer_remaining == 0 or seconds < outer_remaining

    def handler(signum: int, frame: Any) -> None:
        if inner_fired:
            raise RewardTimeout(f"exceeded {seconds:g}s")
        if callable(outer_handler):  # the enclosing deadline is the one that expired
            outer_handler(signum, frame)

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, ours)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_remaining:
            left = outer_remaining - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-4))


def _load_object(ref: str) -> Callable[..., Any]:
    if ref in REWARD_REGISTRY:
        return REWARD_REGISTRY[ref]
    if ":" not in ref:
        known = ", ".join(sorted(REWARD_REGISTRY))
        raise KeyError(f"unknown reward {ref!r}: not registered ({known}) and not 'module:attr' or 'file.py:attr'")
    where, attr = ref.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"reward file {where!r} (from {ref!r}) does not exist")
        mod_name = f"rl_small_user_rewards.{path.stem}_{abs(hash(str(path))) % 10**8}"
        if mod_name not in sys.modules:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module  # so that the function pickles by reference
            spec.loader.exec_module(module)
        module = sys.modules[mod_name]
    else:
        module = importlib.import_module(where)
    if not hasattr(module, attr):
        raise AttributeError(f"reward {ref!r}: {where!r} has no attribute {attr!r}")
    return getattr(module, attr)


def build_reward(ref: str, params: dict[str, Any] | None = None) -> RewardFn:
    """Instantiate a reward: a class gets ``params`` as constructor arguments, a function gets them bound."""
    obj = _load_object(ref)
    params = params or {}
    if inspect.isclass(obj):
        try:
            inspect.signature(obj).bind(**params)
        except TypeError as err:
            raise TypeError(f"reward {ref!r}: bad parameters {sorted(params)}: {err}") from None
        return obj(**params)
    if not callable(obj):
        raise TypeError(f"reward {ref!r} is a {type(obj).__name__}, not a function or class")
    if params:
        sig = inspect.signature(obj)
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        unknown = [k for k in params if k not in sig.parameters]
        if unknown and not accepts_any:
            raise TypeError(f"reward {ref!r} has no parameter(s) {unknown}")
        return functools.partial(obj, **params)
    return obj


@dataclass
class RewardComponent:
    """One weighted reward of a run, with its own deadline and counters."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    timeout_s: float = 10.0
    conversational: bool = False  # completions as [[{"role": "assistant", "content": text}]] (TRL / open-r1)
    columns: dict[str, str] = field(default_factory=dict)  # alias -> e.g. {"answer": "solution"}
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    abstained: int = 0

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float | None]:
        self.calls += 1
        for src, alias in self.columns.items():
            if src not in kwargs:
                raise KeyError(f"reward {self.name!r}: column {src!r} (aliased as {alias!r}) is not in the batch; "
                               f"present: {sorted(kwargs)}")
            kwargs[alias] = kwargs[src]
        given: list[Any] = list(completions)
        if self.conversational:
            given = [[{"role": "assistant", "content": c}] for c in completions]
        try:
            with deadline(self.timeout_s):
                out = self.fn(given, **kwargs)
        except RewardTimeout:
            self.timeouts += 1
            log.warning("reward %r timed out after %gs; it abstains for this batch", self.name, self.timeout_s)
            return [None] * len(completions)
        except Exception as err:  # a user's reward must not kill the run: count and abstain
            self.errors += 1
            log.warning("reward %r raised %s: %s; it abstains for this batch", self.name, type(err).__name__, err)
            return [None] * len(completions)
        out = list(out)
        if len(out) != len(completions):
            raise ValueError(f"reward {self.name!r} returned {len(out)} scores for {len(completions)} completions")
        scores = [None if v is None else float(v) for v in out]
        self.abstained += sum(v is None for v in scores)
        return scores

    def state_dict(self) -> dict[str, Any]:
        fn_state = self.fn.state_dict() if hasattr(self.fn, "state_dict") else None
        counters = {k: getattr(self, k) for k in ("calls", "errors", "timeouts", "abstained")}
        return {"counters": counters, "fn": fn_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state["counters"].items():
            setattr(self, k, v)
        if state.get("fn") is not None and hasattr(self.fn, "load_state_dict"):
            self.fn.load_state_dict(state["fn"])


@dataclass
class CombinedReward:
    """The weighted sum of a run's components; abstentions (None) are left out of the sum."""

    components: list[RewardComponent] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [c.name for c in self.components]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"reward components listed twice: {sorted(dupes)}")

    def __call__(
        self, completions: list[str], **kwargs: Any
    ) -> tuple[list[float], dict[str, list[float | None]], dict[str, float]]:
        """Return (total per completion, scores per component, metrics)."""
        totals = [0.0] * len(completions)
        per: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        for comp in self.components:
            before = (comp.errors, comp.timeouts, comp.abstained)
            t0 = time.perf_counter()
            scores = comp(completions, **kwargs)
            metrics[f"timing/reward/{comp.name}"] = time.perf_counter() - t0
            per[comp.name] = scores
            given = [s for s in scores if s is not None]
            for i, s in enumerate(scores):
                if s is not None:
                    totals[i] += comp.weight * s
            if given:
                metrics[f"reward/{comp.name}"] = sum(given) / len(given)
            metrics[f"reward/{comp.name}/errors"] = float(comp.errors - before[0])
            metrics[f"reward/{comp.name}/timeouts"] = float(comp.timeouts - before[1])
            metrics[f"reward/{comp.name}/abstained"] = float(comp.abstained - before[2])
            if hasattr(comp.fn, "metrics"):  # a stateful reward's own diagnostics (memory/*, ...)
                metrics.update(comp.fn.metrics())
        return totals, per, metrics

    def state_dict(self) -> dict[str, Any]:
        return {c.name: c.state_dict() for c in self.components}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for c in self.components:
            if c.name in state:
                c.load_state_dict(state[c.name])
