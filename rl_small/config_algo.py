"""The policy-loss options of ``algo`` (rl_small.config.AlgoConfig inherits them): which loss, its clip
ranges, and the sampler/trainer importance-sampling correction. rl_small.policy_losses has the registry.
Also the rules that tie ``algo`` options to their owner (an algorithm, a policy loss or a sampling feature):
an option set to a non-default value for an owner the recipe does not use is an error naming both (``algo.gamma`` under ``grpo`` was
silently ignored), and ``dr_grpo`` brings Dr. GRPO's loss aggregation unless ``loss_agg`` is given."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


# option -> what uses it: an algo.name, an algo.policy_loss, or a boolean algo feature that must be on
OWNERS: dict[str, tuple[str, ...]] = {
    "scale_rewards": ("grpo",), "group_baseline": ("reinforce_pp",),
    "gamma": ("ppo",), "lam": ("ppo",), "whiten_advantages": ("ppo",), "value_clip": ("ppo",), "critic_lr": ("ppo",),
    "dual_clip": ("clipped",), "gspo_clip": ("gspo",), "cispo_cap": ("cispo",),
    "dynamic_sampling_on": ("dynamic_sampling",), "max_sampling_rounds": ("dynamic_sampling",),
    "pass_threshold": ("difficulty_filter", "dynamic_sampling"),
    "domain_target": ("domain_sampling",), "domain_tau": ("domain_sampling",), "domain_ewma": ("domain_sampling",),
}
DR_GRPO_LOSS_AGG = "seq_mean_token_sum_norm"  # Dr. GRPO (arXiv 2503.20783): no per-sequence length division


class PolicyLossOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    policy_loss: str = Field(
        "clipped", description="Policy loss (rl_small.policy_losses): clipped (PPO/GRPO surrogate), gspo (sequence "
        "ratio), cispo (clipped stop-gradient weight), or a plug-in 'pkg.module:fn' / 'path/file.py:fn' taking "
        "(logp, old_logp, sampler_logp, advantages, mask, cfg) and returning (per-token loss, metrics).",
    )
    clip: tuple[float, float] = Field(
        (0.2, 0.2), description="clipped: (eps_low, eps_high); DAPO clip-higher: (0.2, 0.28)."
    )
    dual_clip: float | None = Field(
        None, gt=1, description="clipped: dual-clip PPO bound c (3.0 in the paper) for A < 0: loss <= -c*A; null = off."
    )
    gspo_clip: tuple[float, float] = Field(
        (3e-4, 4e-4), description="gspo: (eps_low, eps_high) of the sequence ratio exp(mean_t log pi/pi_old) "
        "(the GSPO paper's 3e-4, 4e-4).",
    )
    cispo_cap: float = Field(
        5.0, gt=0, description="cispo: cap of the stop-gradient weight min(pi/pi_old, cap) (TRL's epsilon_high "
        "for cispo; 5.0 as ScaleRL recommends).",
    )
    tis_cap: float | None = Field(
        2.0, gt=0, description="Sampler correction (Yao et al. 2025): when the backend reports sampler logprobs, "
        "each token's loss is weighted by the ratio pi_old / pi_sampler bounded above by this (tis_mode); "
        "null = no correction.",
    )
    tis_min: float | None = Field(None, gt=0, description="Sampler correction: lower bound of the ratio; null = none.")
    tis_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = Field(
        "token_truncate", description="Sampler correction (TRL's vllm_importance_sampling_mode): token_* one ratio "
        "per token, sequence_* the product over the sequence; *_truncate clamps it to [tis_min, tis_cap], *_mask "
        "zeroes the tokens / sequences outside (TRL's default: sequence_mask, cap 3).",
    )

    @field_validator("clip", "gspo_clip")
    @classmethod
    def _clip_positive(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] < 1 and v[1] > 0):
            raise ValueError(f"clip ranges must be (eps_low in (0,1), eps_high > 0), got {v}")
        return v

    @field_validator("policy_loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        from rl_small.policy_losses import check_policy_loss

        return check_policy_loss(v)

    @model_validator(mode="before")
    @classmethod
    def _dr_grpo_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") == "dr_grpo" and "loss_agg" not in data:
            data = {**data, "loss_agg": DR_GRPO_LOSS_AGG}
        return data

    @model_validator(mode="after")
    def _options_of_unused_owners(self) -> PolicyLossOptions:
        def used(owner: str) -> bool:
            return owner in (getattr(self, "name", None), self.policy_loss) or getattr(self, owner, None) is True

        for key in sorted(self.model_fields_set & set(OWNERS)):  # a default value changes nothing (and every
            default = type(self).model_fields[key].default        # resolved config.yaml lists all of them)
            if getattr(self, key) != default and not any(used(o) for o in OWNERS[key]):
                now = f"name={getattr(self, 'name', None)!r}, policy_loss={self.policy_loss!r}"
                raise ValueError(f"{key} is an option of {' / '.join(OWNERS[key])}, which this algo does not use "
                                 f"({now}): remove it, or turn its owner on")
        return self

    @model_validator(mode="after")
    def _tis_bounds(self) -> PolicyLossOptions:
        if self.tis_min is not None and self.tis_cap is not None and self.tis_min >= self.tis_cap:
            raise ValueError(f"tis_min ({self.tis_min}) must be below tis_cap ({self.tis_cap})")
        return self
