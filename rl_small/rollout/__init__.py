"""Rollout backends behind one protocol (``RolloutBackend``): ``hf``, ``fake`` (vLLM backends: own issue)."""

from rl_small.rollout.base import RolloutBackend, SamplingSpec, make_backend

__all__ = ["RolloutBackend", "SamplingSpec", "make_backend"]
