"""Rollout backends behind one protocol (``RolloutBackend``): ``vllm_server``, ``vllm_engine``, ``hf``, ``fake``; and
``SyncCheck``, the alarm on a sampler that does not serve the trained weights."""

from rl_small.rollout.base import RolloutBackend, RolloutError, SamplingSpec
from rl_small.rollout.factory import make_backend
from rl_small.rollout.sync_check import SyncCheck

__all__ = ["RolloutBackend", "RolloutError", "SamplingSpec", "SyncCheck", "make_backend"]
