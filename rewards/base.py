"""Reward contract, registry, plugin loading and the weighted combination.

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

``CombinedReward`` runs every component (``rewards.runner.RewardComponent``) under a deadline that reward code
cannot cancel (a watchdog thread, not SIGALRM). A component that raises, overruns, or returns a bad value
abstains for that batch and is counted (``reward/<name>/errors``, ``/timeouts``); non-finite values abstain
per item (``/nonfinite``). A component that fails ``max_consecutive_failures`` calls in a row (from its first
call on) stops the run with ``RewardError``, raised after the batch is scored; under DDP
``CombinedReward.agreed(world, ...)`` raises it on every process when it happened on any (each process scores
only its own rollouts). ``CombinedReward.check(sample)`` runs every component once on a sample batch when the
run is built, so a reward that cannot run is a config error (``RewardConfigError``) before the model loads.
Correctness is graded once per batch and shared as the ``correct`` column by the components that declare a
``grader`` (``rewards.graded``). The runner's names (``RewardComponent``, ``RewardError``, ...) are
re-exported here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

# re-exported: rewards.base is the import path of the reward contract (users, tests, rewards.math)
from rewards.deadline import Deadline, RewardTimeout, deadline  # noqa: F401
from rewards.graded import GradedBatch, Grader  # noqa: F401
from rewards.runner import (  # noqa: F401
    RewardComponent,
    RewardConfigError,
    RewardError,
    RewardFn,
    TrainerState,
    is_conversational_prompts,
)

log = logging.getLogger(__name__)

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
    _type_check(ref, obj, params)


def _type_check(ref: str, obj: Callable[..., Any], params: dict[str, Any]) -> None:
    """Each parameter against its annotation (pydantic's lax mode: ``"5"`` fits ``int``, ``"abc"`` does not),
    so ``max_tokens: abc`` is an error naming the parameter at load, not a TypeError deep in the first batch.
    The values are passed on unchanged; annotations that cannot be resolved or checked are skipped."""
    import typing

    from pydantic import TypeAdapter, ValidationError

    try:
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # noqa: BLE001 - names only known to a type checker, or no annotations to read
        return
    for key, value in params.items():
        if key not in hints or hints[key] is Any:
            continue
        try:
            adapter = TypeAdapter(hints[key])
        except Exception:  # noqa: BLE001 - a type pydantic cannot check (a callable, an arbitrary class)
            continue
        try:
            adapter.validate_python(value)
        except ValidationError:
            want = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
            raise TypeError(f"reward {ref!r}: parameter {key}={value!r} does not fit its type {want}") from None


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


# ---- combination ----------------------------------------------------------------------------------------
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
        graded = GradedBatch()  # correctness, graded once per batch for every component that needs it
        for comp in self.components:
            before = {k: getattr(comp, k) for k in _COUNTERS}
            t0 = time.perf_counter()
            scores = comp(completions, graded, **kwargs)
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
        problems, graded = [], GradedBatch()
        for comp in self.components:
            try:
                comp.check(completions, graded, **self._state(kwargs))
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
