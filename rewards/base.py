"""Reward contract, registry, plugin loading, deadlines and the weighted combination.

A reward is a plain function or a picklable callable class following TRL's contract::

    @register_reward("my_reward")
    def my_reward(completions: list[str], **kwargs) -> list[float | None]: ...

It is called the way TRL's ``GRPOTrainer._calculate_rewards`` calls it: everything by keyword,
``f(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_extra=..., log_metric=...,
**columns)``, so functions whose signature starts with ``completion_ids`` work. ``None`` means "no opinion":
excluded from the weighted sum and counted. A reward named in a recipe is a registry name, a dotted path
``pkg.module:attr`` or a file path ``path/to/file.py:attr`` (a file inside a package, such as open-r1's
``src/open_r1/rewards.py``, is imported as part of its package, so its relative imports work).

Recipe keys besides name/weight/... are the reward's parameters: a class gets them as constructor arguments;
a *factory* (a function that cannot take the keywords a reward gets: none of ``prompts``, ``completions``,
``completion_ids`` nor ``**kwargs``, e.g. TRL's ``get_soft_overlong_punishment(max_completion_len, ...)``)
is called with them once and returns the reward; any other function gets them bound as keyword arguments.

``CombinedReward`` runs every component under a deadline that reward code cannot cancel (a watchdog thread,
not SIGALRM). A component that raises, overruns, or returns a bad value abstains for that batch and is
counted (``reward/<name>/errors``, ``/timeouts``); non-finite values abstain per item (``/nonfinite``).
A component that fails ``max_consecutive_failures`` calls in a row (from its first call on) stops the run
with ``RewardError``, raised after the batch is scored; under DDP ``CombinedReward.agreed(world, ...)`` raises
it on every process when it happened on any (each process scores only its own rollouts). ``CombinedReward.check(sample)`` runs every component once on a sample batch when the
run is built, so a reward that cannot run is a config error (``RewardConfigError``) before the model loads.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from rewards.deadline import Deadline, RewardTimeout, deadline  # noqa: F401 (re-exported: rewards.math uses them)

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float | None]]
REWARD_REGISTRY: dict[str, Callable[..., Any]] = {}
REWARD_CALL_KEYS = ("prompts", "completions", "completion_ids")  # what GRPOTrainer passes every reward


def register_reward(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a reward function or class under ``name``; a second registration of a name is an error."""

    def wrap(obj: Callable[..., Any]) -> Callable[..., Any]:
        if name in REWARD_REGISTRY and REWARD_REGISTRY[name] is not obj:
            raise ValueError(f"reward name {name!r} is already registered by {REWARD_REGISTRY[name]!r}")
        REWARD_REGISTRY[name] = obj
        return obj

    return wrap


class RewardError(RuntimeError):
    """A reward failed on every one of its last K calls: the run stops (``rl-small: error: ...``)."""


class RewardConfigError(ValueError):
    """A reward cannot run on the sample batch checked when the run is built."""


# ---- loading --------------------------------------------------------------------------------------------
def _import_file(path: Path, ref: str) -> ModuleType:
    """Import ``path``; inside a package (``__init__.py`` up the folders) as part of that package."""
    parts, root = [path.stem], path.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    if parts[-1] == "__init__":
        parts.pop()
    if len(parts) == 1:  # a lone file: a private module name, registered so that its functions pickle
        mod_name = f"rl_small_user_rewards.{path.stem}_{abs(hash(str(path))) % 10**8}"
        if mod_name not in sys.modules:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        return sys.modules[mod_name]
    top, top_dir = parts[0], root / parts[0]
    have = sys.modules.get(top)
    if have is None:
        spec = importlib.util.spec_from_file_location(top, top_dir / "__init__.py",
                                                      submodule_search_locations=[str(top_dir)])
        assert spec is not None and spec.loader is not None
        have = importlib.util.module_from_spec(spec)
        sys.modules[top] = have
        try:
            spec.loader.exec_module(have)
        except BaseException:
            del sys.modules[top]
            raise
    where = [Path(p).resolve() for p in getattr(have, "__path__", [])]
    if top_dir.resolve() not in where:
        raise ImportError(f"reward {ref!r}: package {top!r} is already imported from {where or have!r}, "
                          f"not from {top_dir}")
    return importlib.import_module(".".join(parts))


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
        module = _import_file(path, ref)
    else:
        module = importlib.import_module(where)
    if not hasattr(module, attr):
        raise AttributeError(f"reward {ref!r}: {where!r} has no attribute {attr!r}")
    return getattr(module, attr)


def takes_reward_call(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` can receive the keywords GRPOTrainer passes a reward (``prompts``, ``completions``,
    ``completion_ids``: named, or through ``**kwargs``). A function that cannot is a factory."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name in REWARD_CALL_KEYS and p.kind is not p.POSITIONAL_ONLY)
               for p in params)


def _bind_check(ref: str, obj: Callable[..., Any], params: dict[str, Any]) -> None:
    try:
        inspect.signature(obj).bind(**params)
    except TypeError as err:
        raise TypeError(f"reward {ref!r}: bad parameters {sorted(params)}: {err}") from None


def build_reward(ref: str, params: dict[str, Any] | None = None, factory: bool | None = None) -> RewardFn:
    """Instantiate a reward: a class gets ``params`` as constructor arguments, a factory is called with them
    and returns the reward (``factory=None``: a function that cannot take a reward's keywords is a factory),
    any other function gets them bound."""
    obj = _load_object(ref)
    params = params or {}
    if inspect.isclass(obj):
        _bind_check(ref, obj, params)
        return obj(**params)
    if not callable(obj):
        raise TypeError(f"reward {ref!r} is a {type(obj).__name__}, not a function or class")
    if factory if factory is not None else not takes_reward_call(obj):
        _bind_check(ref, obj, params)
        fn = obj(**params)
        if not callable(fn):
            raise TypeError(f"reward {ref!r} is called as a factory but returned {fn!r}, not a reward function")
        return fn
    if params:
        sig = inspect.signature(obj)
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        unknown = [k for k in params if k not in sig.parameters]
        if unknown and not accepts_any:
            raise TypeError(f"reward {ref!r} has no parameter(s) {unknown}")
        return functools.partial(obj, **params)
    return obj


# ---- calling --------------------------------------------------------------------------------------------
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

    def run(self, completions: list[str], **kwargs: Any) -> list[float | None]:
        """One call under the deadline: scores, or RewardTimeout / the reward's exception / ValueError."""
        kw = self._accepted(self._kwargs(completions, kwargs))
        with deadline(self.timeout_s) as d:
            out = self.fn(**kw)
        if d is not None and d.fired:  # it overran but caught our RewardTimeout itself
            raise RewardTimeout(f"exceeded {self.timeout_s:g}s")
        return _as_scores(self.name, out, len(completions))

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float | None]:
        """Scores of one batch; a failure abstains for the batch and is counted; K in a row set ``stop`` (the
        RewardError that CombinedReward raises once every component has scored the batch)."""
        self.calls += 1
        n = len(completions)
        try:
            scores = self.run(completions, **kwargs)
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

    def check(self, completions: list[str], **kwargs: Any) -> None:
        """Run once on a sample batch, leaving counters and state as they were; RewardConfigError if it cannot
        run. A reward that needs the policy bound first (``bind_policy``, and ``needs_policy`` true or absent)
        is not checked; a timeout only warns."""
        if hasattr(self.fn, "bind_policy") and getattr(self.fn, "needs_policy", True):
            return
        stateful = hasattr(self.fn, "state_dict") and hasattr(self.fn, "load_state_dict")
        state = self.fn.state_dict() if stateful else None  # type: ignore[attr-defined]
        try:
            self.run(completions, **kwargs)
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


_COUNTERS = ("errors", "timeouts", "abstained", "nonfinite")


@dataclass
class CombinedReward:
    """The weighted sum of a run's components; abstentions (None) are left out of the sum."""

    components: list[RewardComponent] = field(default_factory=list)
    max_steps: int = 0  # for ``trainer_state.max_steps``

    def __post_init__(self) -> None:
        names = [c.name for c in self.components]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"reward components listed twice: {dupes}; give each a distinct name")

    def _state(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        step = kwargs.get("step", 0)
        return {"trainer_state": TrainerState(step if isinstance(step, int) else 0, self.max_steps)} | kwargs

    def __call__(
        self, completions: list[str], **kwargs: Any
    ) -> tuple[list[float], dict[str, list[float | None]], dict[str, float]]:
        """Return (total per completion, scores per component, metrics); RewardError once every component has
        scored the batch if one reached its ``max_consecutive_failures``."""
        return self.agreed(None, completions, **kwargs)

    def agreed(
        self, world: Any, completions: list[str], **kwargs: Any
    ) -> tuple[list[float], dict[str, list[float | None]], dict[str, float]]:
        """``self(completions, **kwargs)`` with the stop decided by every process of ``world``
        (rl_small.distributed.World; None: this process alone). Under DDP each process scores only its own
        rollouts, so a reward can reach its failure limit on one process: every process then raises the same
        RewardError, naming the process, where that one raising alone would leave the others waiting forever
        in the next collective. Every process must call it for each batch (one gather when ``world.size > 1``)."""
        out = self._score(completions, **kwargs)
        mine = next((c.stop for c in self.components if c.stop is not None), None)
        if world is None or world.size == 1:
            if mine is not None:
                raise mine
            return out
        stops = world.gather([None if mine is None else str(mine)])  # one entry per process, in rank order
        rank, msg = next(((r, m) for r, m in enumerate(stops) if m is not None), (None, None))
        if msg is not None:
            raise RewardError(f"{msg} (on process {rank} of {len(stops)})") from (mine.__cause__ if mine else None)
        return out

    def _score(
        self, completions: list[str], **kwargs: Any
    ) -> tuple[list[float], dict[str, list[float | None]], dict[str, float]]:
        totals = [0.0] * len(completions)
        per: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        kwargs = self._state(kwargs)
        for comp in self.components:
            before = {k: getattr(comp, k) for k in _COUNTERS}
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
            for k in _COUNTERS:
                metrics[f"reward/{comp.name}/{k}"] = float(getattr(comp, k) - before[k])
            for k, v in comp.own_metrics().items():  # a counter the reward also reports (timeouts) adds up
                metrics[k] = metrics.get(k, 0.0) + v if k.rsplit("/", 1)[-1] in _COUNTERS else v
        return totals, per, metrics

    def check(self, completions: list[str], **kwargs: Any) -> None:
        """Run every component once on a sample batch; RewardConfigError naming each one that cannot run."""
        problems = []
        for comp in self.components:
            try:
                comp.check(completions, **self._state(kwargs))
            except RewardConfigError as err:
                problems.append(str(err))
        if problems:
            raise RewardConfigError("; ".join(problems))

    def state_dict(self) -> dict[str, Any]:
        return {c.name: c.state_dict() for c in self.components}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for c in self.components:
            if c.name in state:
                c.load_state_dict(state[c.name])
