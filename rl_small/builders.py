"""Objects a run builds from its config before training: reward components, the LR schedule, seeds; and the
checks that refuse a config/launch combination the trainer cannot run, before any model loads.

    check_run(cfg, accelerator); rewards = build_rewards(cfg, domain_rows); scheduler = make_scheduler(optimizer, cfg)
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

from rewards import REWARD_REGISTRY, CombinedReward, RewardComponent, RewardConfigError, build_reward
from rl_small.config import RecipeError, RunConfig


def check_run(cfg: RunConfig, acc: Any) -> None:
    """Refuse, naming the setting, what this trainer cannot run: KL or PPO without LoRA, sharded training
    (FSDP / DeepSpeed), inconsistent sampling options."""
    a = cfg.algo
    if (a.kl_coef > 0 or a.log_kl) and cfg.model.lora is None:
        raise RecipeError("algo.kl_coef > 0 or algo.log_kl needs model.lora (the reference is the adapter-free base)")
    if a.name == "ppo" and cfg.model.lora is None:
        raise RecipeError("algo.name=ppo needs model.lora: the critic is a second LoRA adapter on the same base")
    kind = str(getattr(acc.distributed_type, "value", acc.distributed_type))
    if kind in ("FSDP", "DEEPSPEED"):
        # The adapter save, the rollout sync and hf generation read unwrap_model()'s parameters, which are
        # shards under FSDP / ZeRO-3; a gathered state dict and DeepSpeed's micro-batch stepping are not built.
        raise RecipeError(f"accelerate distributed_type {kind} is not supported by the trainer yet: use "
                         "launch/accelerate/ddp.yaml (or single_gpu.yaml)")
    r = cfg.rollout
    if r.sync_check_error is not None and r.sync_check_error < r.sync_check_warn:
        raise RecipeError(f"rollout.sync_check_error={r.sync_check_error} is below rollout.sync_check_warn="
                          f"{r.sync_check_warn}: jumps between the two would never stop the run")
    if a.domain_sampling and len(cfg.data.mix) < 2:
        raise RecipeError("algo.domain_sampling needs data.mix with at least two tasks")
    names = [r.name for r in cfg.rewards]
    if (a.difficulty_filter or (a.dynamic_sampling and a.dynamic_sampling_on == "pass")) and a.pass_reward not in names:
        raise RecipeError(f"algo.pass_reward {a.pass_reward!r} is not one of the recipe's rewards {names}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_rewards(cfg: RunConfig, domain_rows: dict[str, tuple[Any, list[dict[str, Any]]]] | None = None
                  ) -> CombinedReward:
    """Instantiate the recipe's reward components (each with its own parameters, weight and deadline); a
    reward listed again is named ``name#2``, ``name#3``. With ``domain_rows`` (the data, before the model
    loads), every reward runs once on a sample batch of each domain: one that cannot run is a RecipeError."""
    comps, seen = [], {}
    for i, spec in enumerate(cfg.rewards):
        try:
            fn = build_reward(spec.name, spec.params, spec.factory)
        except (KeyError, TypeError, AttributeError, ImportError, FileNotFoundError, ValueError) as err:
            raise RecipeError(f"rewards[{i}] ({spec.name!r}): {err}") from err
        seen[spec.name] = seen.get(spec.name, 0) + 1
        name = spec.name if seen[spec.name] == 1 else f"{spec.name}#{seen[spec.name]}"
        comps.append(RewardComponent(name, fn, spec.weight, spec.timeout_s, spec.conversational, spec.columns,
                                     spec.max_consecutive_failures, native=spec.name in REWARD_REGISTRY))
    combined = CombinedReward(comps, max_steps=cfg.train.steps)
    for domain, (_, rows) in (domain_rows or {}).items():
        if rows:
            try:
                completions, kwargs = sample_batch(domain, rows[0])
                combined.check(completions, **kwargs)
            except RewardConfigError as err:
                raise RecipeError(f"rewards (checked on a sample of data {domain!r}): {err}") from err
    return combined


def sample_batch(domain: str, row: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Two completions for one dataset row, with the keywords the trainer passes (``Trainer.score``): one in
    think/answer form ending in the gold answer boxed, one without an answer."""
    gold = row.get("answer", "")
    completions = [f"<think>\nLet me work it out.\n</think>\n<answer>\n\\boxed{{{gold}}}\n</answer>", "I am not sure."]
    columns = {k: [v, v] for k, v in row.items() if k != "id"} | {"domain": [domain, domain]}
    question = str(row.get("question", ""))
    return completions, {
        "prompts": [question, question], "completion_ids": [list(range(len(c) // 4 + 1)) for c in completions],
        "group_id": [0, 0], "truncated": [False, False], "step": 0, **columns,
    }


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    o, total = cfg.optim, max(cfg.train.steps, 1)

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        frac = (step - o.warmup_steps) / max(total - o.warmup_steps, 1)
        if o.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        if o.schedule == "linear":
            return max(1.0 - frac, 0.0)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
