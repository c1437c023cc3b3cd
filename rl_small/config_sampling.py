"""The ``sampling`` section: the group and prompt filters between generation and the update (docs/METHODS.md
§3): DAPO dynamic sampling and overlong filtering, SimpleRL-Zoo's difficulty filter, RuleReasoner's
domain-aware sampling over ``data.mix``. Read by the rollout stream (rl_small.sampling, rl_small.data).

    cfg.sampling.dynamic_sampling      # recipe: sampling: {dynamic_sampling: true, max_sampling_rounds: 3}
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rl_small.config_algo import check_owners

log = logging.getLogger("rl_small")
# option -> the filter(s) that use it: an option of a filter that is off is an error
SAMPLING_OWNERS: dict[str, tuple[str, ...]] = {
    "dynamic_sampling_on": ("dynamic_sampling",), "max_sampling_rounds": ("dynamic_sampling",),
    "pass_threshold": ("difficulty_filter", "dynamic_sampling"),
    "domain_target": ("domain_sampling",), "domain_tau": ("domain_sampling",), "domain_ewma": ("domain_sampling",),
}


class SamplingConfig(BaseModel):
    """Batch-level sampling (docs/METHODS.md §3): which groups and prompts reach the update. An option of a
    filter that is off, set to a non-default value, is an error naming the filter."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    dynamic_sampling: bool = Field(
        False, description="DAPO: drop groups that all pass or all fail (see dynamic_sampling_on) and draw more "
        "prompts to refill the batch."
    )
    dynamic_sampling_on: Literal["auto", "pass", "reward"] = Field(
        "auto", description="dynamic_sampling: what must differ within a group to keep it. pass: whether each "
        "completion passes (sampling.pass_reward >= sampling.pass_threshold; DAPO's accuracy filter); reward: the "
        "total reward; auto: pass when sampling.pass_reward is one of the rewards, else reward."
    )
    max_sampling_rounds: int = Field(3, ge=0, description="dynamic_sampling: cap on extra generation rounds per step.")
    overlong_filter: bool = Field(
        False, description="DAPO overlong filtering: truncated completions get no policy loss (masked out)."
    )
    difficulty_filter: bool = Field(
        False, description="SimpleRL-Zoo: skip prompts whose running pass rate is 0 or 1 once they have been seen."
    )
    pass_reward: str = Field("math_accuracy", description="difficulty_filter, dynamic_sampling: the reward component "
                             "that defines a pass.")
    pass_threshold: float = Field(0.5, description="difficulty_filter, dynamic_sampling: a completion passes if that "
                                  "score >= this.")
    domain_sampling: bool = Field(
        False, description="RuleReasoner domain-aware dynamic sampling over data.mix: domains with a lower "
        "running reward are drawn more often (w = softmax(max(0, target - rbar) / tau)).",
    )
    domain_target: float = Field(1.0, description="domain_sampling: the reward a domain is measured against.")
    domain_tau: float = Field(0.8, gt=0, description="domain_sampling: softmax temperature (smaller = sharper).")
    domain_ewma: float = Field(0.5, ge=0, lt=1, description="domain_sampling: weight of the old reward estimate.")

    @model_validator(mode="after")
    def _options_of_filters_that_are_off(self) -> SamplingConfig:
        on = {k for k in ("dynamic_sampling", "difficulty_filter", "domain_sampling") if getattr(self, k)}
        for key in check_owners(self, SAMPLING_OWNERS, on):
            raise ValueError(f"sampling.{key} is an option of {' / '.join(SAMPLING_OWNERS[key])}, which is off: "
                             "remove it, or turn it on")
        return self


def sampling_keys_in_algo(data: Any) -> Any:
    """Before validation of the run config: ``algo.dynamic_sampling`` and the other options of ``sampling``, which were
    options of ``algo`` before, move there with a deprecation warning naming the new key, so recipes of earlier
    versions keep working; the same key in both sections is an error."""
    algo = data.get("algo") if isinstance(data, dict) else None
    moved = [k for k in SamplingConfig.model_fields if isinstance(algo, dict) and k in algo]
    if not moved:
        return data
    assert isinstance(algo, dict)
    sampling = data.get("sampling") or {}
    if not isinstance(sampling, dict):
        return data
    data = {**data, "algo": {k: v for k, v in algo.items() if k not in moved}, "sampling": dict(sampling)}
    for key in moved:
        if key in sampling:
            raise ValueError(f"algo.{key} and sampling.{key} are both set: keep only sampling.{key}")
        data["sampling"][key] = algo[key]
    log.warning("deprecated: %s moved to the sampling section (%s)", ", ".join(f"algo.{k}" for k in moved),
                ", ".join(f"sampling.{k}" for k in moved))
    return data
