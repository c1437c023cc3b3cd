"""The ``algo`` section: one typed variant per algorithm, chosen by ``name`` (a pydantic discriminated union,
as prime-rl's loss config), each class carrying its paper's defaults (docs/METHODS.md §1-2):

    grpo          group mean and std (scale_rewards)                  DeepSeekMath, arXiv 2402.03300
    dr_grpo       no std division, loss_agg seq_mean_token_sum_norm   Dr. GRPO, arXiv 2503.20783
    rloo          leave-one-out baseline                              arXiv 2402.14740
    reinforce_pp  batch-normalised returns (group_baseline)           REINFORCE++, arXiv 2501.03262
    ppo           GAE with a learned critic (gamma, lam, whiten_advantages, value_clip, critic_lr)

Shared options (KL, entropy, aggregation, update schedule) and the policy-loss options (which loss, its clip
ranges, the sampler correction; rl_small.policy_losses has the registry) live in the common base. An option of
another variant is an error naming its owner(s) (``algo.gamma is an option of ppo, not of grpo``); a
policy-loss option set for a loss the recipe does not use is one too (``OWNERS``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# policy-loss option -> the algo.policy_loss values that use it
OWNERS: dict[str, tuple[str, ...]] = {"dual_clip": ("clipped",), "gspo_clip": ("gspo",), "cispo_cap": ("cispo",)}
DR_GRPO_LOSS_AGG = "seq_mean_token_sum_norm"  # Dr. GRPO (arXiv 2503.20783): no per-sequence length division


def check_owners(model: BaseModel, owners: dict[str, tuple[str, ...]], used: set[str]) -> list[str]:
    """The options of ``owners`` set on ``model`` to a non-default value while none of their owners is in
    ``used``. A default value changes nothing (a resolved config.yaml lists every option) and is accepted."""
    fields = type(model).model_fields
    return [key for key in sorted(model.model_fields_set & set(owners))
            if getattr(model, key) != fields[key].get_default(call_default_factory=True) and not used & set(owners[key])]


class AlgoBase(BaseModel):
    """Options every algorithm shares: policy loss and sampler correction, KL, entropy, loss aggregation and
    the update schedule."""

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
    kl_coef: float = Field(0.0, ge=0, description="beta of the KL to the reference (base model, adapter off).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3", description="KL estimator with r = pi_ref/pi: k1 = -log r, k2 = (log r)^2/2, k3 = r - 1 - log r."
    )
    kl_mode: Literal["loss", "reward"] = Field(
        "loss", description="loss: beta*KL is a loss term; reward: -beta*KL_t of the sampling policy is added to "
        "the rewards before the advantages (per token for ppo/reinforce_pp, summed per sequence otherwise).",
    )
    log_kl: bool = Field(
        False, description="Compute the KL to the reference for metrics even when kl_coef = 0 (a no-grad forward)."
    )
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus: loss -= coef * aggregated token entropy.")
    entropy_log_every: int = Field(
        5, ge=0, description="Compute the policy/entropy metric every N steps (0 = never) when entropy_coef = 0: "
        "one more pass over the vocabulary per token; with entropy_coef > 0 it is computed (and logged) every step.",
    )
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="Loss aggregation over tokens and sequences."
    )
    epochs: int = Field(1, ge=1, description="Passes over each rollout batch (PPO epochs, mu).")
    minibatches: int = Field(
        1, ge=1, description="Optimizer steps per epoch: the batch is split (by whole groups) into this many parts."
    )
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward/backward (grad accumulation).")

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

    @model_validator(mode="after")
    def _policy_loss_options(self) -> AlgoBase:
        for key in check_owners(self, OWNERS, {self.policy_loss}):
            raise ValueError(f"algo.{key} is an option of policy_loss {' / '.join(OWNERS[key])}, not of "
                             f"{self.policy_loss!r}: remove it, or set algo.policy_loss")
        if self.tis_min is not None and self.tis_cap is not None and self.tis_min >= self.tis_cap:
            raise ValueError(f"tis_min ({self.tis_min}) must be below tis_cap ({self.tis_cap})")
        return self


class GrpoConfig(AlgoBase):
    name: Literal["grpo"] = Field("grpo", description="GRPO: A = (r - mean_group) / (std_group + eps).")
    scale_rewards: bool = Field(True, description="grpo: divide by the group std (false: Dr. GRPO's advantage).")


class DrGrpoConfig(AlgoBase):
    name: Literal["dr_grpo"] = Field("dr_grpo", description="Dr. GRPO: A = r - mean_group, a constant loss norm.")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        DR_GRPO_LOSS_AGG, description="Loss aggregation; Dr. GRPO's: sum over tokens / (G x max length)."
    )


class RlooConfig(AlgoBase):
    name: Literal["rloo"] = Field("rloo", description="RLOO: A = r - mean of the other completions of the group.")


class ReinforcePPConfig(AlgoBase):
    name: Literal["reinforce_pp"] = Field(
        "reinforce_pp", description="REINFORCE++: per-token returns normalised over the global batch."
    )
    group_baseline: bool = Field(
        False, description="reinforce_pp: subtract the group mean reward first (REINFORCE++-baseline)."
    )


class PpoConfig(AlgoBase):
    name: Literal["ppo"] = Field("ppo", description="PPO: GAE with a learned critic (own LoRA adapter + value head).")
    gamma: float = Field(1.0, gt=0, le=1, description="ppo: GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="ppo: GAE lambda.")
    whiten_advantages: bool = Field(True, description="ppo: whiten GAE advantages over the batch's tokens.")
    value_clip: float | None = Field(
        0.2, gt=0, description="ppo: value-loss clip range around the old values; null = off."
    )
    critic_lr: float | None = Field(
        None, gt=0, description="ppo: critic (adapter + head) learning rate; null = optim.lr."
    )


VARIANTS: dict[str, type[AlgoBase]] = {
    "grpo": GrpoConfig, "dr_grpo": DrGrpoConfig, "rloo": RlooConfig, "reinforce_pp": ReinforcePPConfig,
    "ppo": PpoConfig,
}
AlgoConfig = Annotated[
    GrpoConfig | DrGrpoConfig | RlooConfig | ReinforcePPConfig | PpoConfig, Field(discriminator="name")
]


def variant_options(data: Any) -> Any:
    """Before validation of ``algo``: ``name`` defaults to grpo, and a key of another variant is an error naming
    the variant(s) it belongs to (``algo.gamma is an option of ppo, not of grpo``) unless it holds that variant's
    default, which changes nothing (resolved config.yaml files of earlier versions listed every option)."""
    if not isinstance(data, dict):
        return data
    name = data.get("name", "grpo")
    if not isinstance(name, str) or name not in VARIANTS:
        raise ValueError(f"algo.name {name!r} is not one of {', '.join(VARIANTS)}")
    own = VARIANTS[name].model_fields
    out = {"name": name}
    for key, value in data.items():
        holders = [n for n, v in VARIANTS.items() if key in v.model_fields and key not in AlgoBase.model_fields]
        if key not in own and holders:
            if all(value == VARIANTS[n].model_fields[key].get_default(call_default_factory=True) for n in holders):
                continue
            raise ValueError(f"algo.{key} is an option of {' / '.join(holders)}, not of {name}")
        out[key] = value
    return out
