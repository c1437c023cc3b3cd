"""The policy-loss registry: one signature, built-in entries by name, plug-ins by import path.

    @register_policy_loss("my_loss")
    def my_loss(logp, old_logp, sampler_logp, advantages, mask, cfg):   # -> (loss (B, T), metrics)
        ...

Every entry takes log pi (B, T) with its graph, log pi_old (B, T) (no grad; the detached log pi when the step is
on-policy), the sampler's logprobs (B, T) or None (the backend did not report them), the advantages (B, T),
the loss mask (B, T) (1 on completion tokens, times the sequence's loss weight) and the ``algo`` config
section, and returns the per-token loss (B, T) (aggregated by the trainer with ``algo.loss_agg``) and a dict
of metrics, name -> (B, T) per-token values logged as their token mean over the mask (e.g.
``loss/clip_frac``). Built-ins live in rl_small.losses: ``clipped`` (PPO / GRPO, clip-higher, dual clip),
``gspo`` (sequence-level ratio), ``cispo`` (clipped stop-gradient weight). ``algo.policy_loss`` names one, or
a plug-in ``pkg.module:fn`` / ``path/to/file.py:fn``, resolved when the recipe is loaded. The sampler
correction (``algo.tis_*``) is applied by ``rl_small.losses.policy_loss`` to whatever the entry returns; a
plug-in that corrects on its own runs with ``algo.tis_cap: null``.

This module imports no torch: a recipe is checked (``check_policy_loss``) without loading the stack.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Metrics = dict[str, "torch.Tensor"]
PolicyLossFn = Callable[..., "tuple[torch.Tensor, Metrics]"]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
_LOADED: dict[str, PolicyLossFn] = {}  # import paths already resolved
BUILTIN_POLICY_LOSSES = ("clipped", "gspo", "cispo")  # registered when rl_small.losses is imported
SIGNATURE = "(logp, old_logp, sampler_logp, advantages, mask, cfg)"


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register a policy loss under ``name``; a second registration of a name by another function is an error."""

    def wrap(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES and POLICY_LOSSES[name] is not fn:
            raise ValueError(f"policy loss name {name!r} is already registered by {POLICY_LOSSES[name]!r}")
        POLICY_LOSSES[name] = fn
        return fn

    return wrap


def known_policy_losses() -> list[str]:
    return sorted(set(POLICY_LOSSES) | set(BUILTIN_POLICY_LOSSES))


def _load(ref: str) -> PolicyLossFn:
    if ":" not in ref:
        raise KeyError(f"unknown policy loss {ref!r}: not registered ({', '.join(known_policy_losses())}) and "
                       "not 'pkg.module:fn' or 'path/to/file.py:fn'")
    where, attr = ref.rsplit(":", 1)
    if where.endswith(".py"):
        from rewards.base import _import_file  # the rewards' loader: a file in a package joins it

        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"policy loss file {where!r} (from {ref!r}) does not exist")
        module = _import_file(path, ref)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, attr, None)
    if fn is None:
        raise AttributeError(f"policy loss {ref!r}: {where!r} has no attribute {attr!r}")
    try:
        inspect.signature(fn).bind(*range(6))
    except (TypeError, ValueError) as err:
        raise TypeError(f"policy loss {ref!r} must take {SIGNATURE}: {err}") from None
    return fn


def resolve_policy_loss(ref: str) -> PolicyLossFn:
    """The function registered as ``ref``, or loaded from the import path ``ref`` (cached)."""
    if ref not in POLICY_LOSSES and ref in BUILTIN_POLICY_LOSSES:
        import rl_small.losses  # noqa: F401 (registers the built-ins)
    if ref in POLICY_LOSSES:
        return POLICY_LOSSES[ref]
    if ref not in _LOADED:
        _LOADED[ref] = _load(ref)
    return _LOADED[ref]


def check_policy_loss(ref: str) -> str:
    """``ref`` if it names a policy loss (a plug-in is imported now), else ValueError naming it and listing
    the registered ones: the recipe fails when it is loaded, not at the first step."""
    if ref in BUILTIN_POLICY_LOSSES or ref in POLICY_LOSSES:
        return ref
    try:
        resolve_policy_loss(ref)
    except (ImportError, KeyError, AttributeError, FileNotFoundError, TypeError) as err:
        msg = str(err.args[0]) if isinstance(err, KeyError) else str(err)
        if "unknown policy loss" not in msg:
            msg = f"policy loss {ref!r} cannot be loaded: {msg} (registered: {', '.join(known_policy_losses())})"
        raise ValueError(msg) from None
    return ref
