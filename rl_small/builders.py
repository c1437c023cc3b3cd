"""Objects a run builds from its config before training: reward components, the LR schedule, seeds; and the
checks that refuse a config/launch combination the trainer cannot run, before any model loads.

    check_run(cfg, accelerator); rewards = build_rewards(cfg, domain_rows); scheduler = make_scheduler(optimizer, cfg)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from rewards import REWARD_REGISTRY, CombinedReward, RewardComponent, RewardConfigError, build_reward
from rl_small.config import RecipeError, RunConfig


def check_run(cfg: RunConfig, acc: Any) -> None:
    """Refuse, naming the setting, what this trainer cannot run: KL or PPO without LoRA, sharded training
    (FSDP / DeepSpeed), inconsistent sampling options."""
    a, s = cfg.algo, cfg.sampling
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
    if r.sync != "adapter" and cfg.model.lora is None:
        raise RecipeError(f"rollout.sync={r.sync} merges a LoRA adapter into the base weights: it needs model.lora "
                          "(full fine-tuning pushes full weights already)")
    if r.sync_check_error is not None and r.sync_check_error < r.sync_check_warn:
        raise RecipeError(f"rollout.sync_check_error={r.sync_check_error} is below rollout.sync_check_warn="
                          f"{r.sync_check_warn}: jumps between the two would never stop the run")
    if s.domain_sampling and len(cfg.data.mix) < 2:
        raise RecipeError("sampling.domain_sampling needs data.mix with at least two tasks")
    names = [r.name for r in cfg.rewards]
    if (s.difficulty_filter or (s.dynamic_sampling and s.dynamic_sampling_on == "pass")) and s.pass_reward not in names:
        raise RecipeError(f"sampling.pass_reward {s.pass_reward!r} is not one of the recipe's rewards {names}")


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (CPU and every GPU) with ``seed``: Accelerate's ``set_seed``."""
    from accelerate.utils import set_seed

    set_seed(seed)


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
    """Two completions for one dataset row, with the keywords the trainer passes (``RolloutStream.score``): one in
    think/answer form ending in the gold answer boxed, one without an answer."""
    gold = row.get("answer", "")
    completions = [f"<think>\nLet me work it out.\n</think>\n<answer>\n\\boxed{{{gold}}}\n</answer>", "I am not sure."]
    columns = {k: [v, v] for k, v in row.items() if k != "id"} | {"domain": [domain, domain]}
    question = str(row.get("question", ""))
    return completions, {
        "prompts": [question, question], "completion_ids": [list(range(len(c) // 4 + 1)) for c in completions],
        "group_id": [0, 0], "truncated": [False, False], "step": 0, **columns,
    }


def _warmup_ahead(hf_factor: Callable[[int], float], warmup: int, step: int) -> float:
    """transformers' LR factor, one step ahead during the warm-up: its warm-up starts at 0 (step 0 would train
    at LR 0), this one at 1/warmup and reaches the full LR on the warm-up's last step; the decay after it is
    transformers' own."""
    return hf_factor(step + 1 if step < warmup else step)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``optim.schedule`` (constant / linear / cosine, after ``optim.warmup_steps`` of linear warm-up over
    ``train.steps``) from ``transformers.get_scheduler``. With warm-up w and T steps, step s (0-based) trains at
    lr x (s + 1) / w while s < w, then lr x 1 (constant), (T - s) / (T - w) (linear) or
    (1 + cos(pi (s - w) / (T - w))) / 2 (cosine)."""
    from transformers import get_scheduler

    o = cfg.optim
    name = "constant_with_warmup" if o.schedule == "constant" else o.schedule
    total = max(cfg.train.steps, o.warmup_steps + 1)  # warm-up through the last step: hf(w) is the decay's 1, not 0
    hf = get_scheduler(name, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=total)
    factors = [partial(_warmup_ahead, f, o.warmup_steps) for f in hf.lr_lambdas]  # base LRs: hf's initial_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
