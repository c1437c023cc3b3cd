"""The GRPO training loop: ``step()`` is a list of named, timed stages; ``fit()`` repeats it.

    trainer = Trainer(cfg, run_dir)          # loads model (+LoRA), data, rewards, backend; resumes if asked
    trainer.fit()                            # steps, checkpoints, metrics.jsonl, progress bar

Stages of a step: prompts -> rollout -> reward -> advantage -> update -> sync. Runs under Accelerate, so the
same code serves ``python -m rl_small.train`` and ``accelerate launch -m rl_small.train``.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewards import CombinedReward, RewardComponent, build_reward
from rl_small.advantages import ADVANTAGES
from rl_small.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from rl_small.config import RecipeError, RunConfig
from rl_small.data import build_prompts, load_task_rows
from rl_small.logprobs import completion_logprobs
from rl_small.losses import aggregate, clipped_policy_loss, kl_k3
from rl_small.rollout.base import SamplingSpec, make_backend
from rl_small.tracking import Progress, Tracker, timer
from rl_small.types import Prompt, Rollout, ScoredRollout, batch_columns

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_rewards(cfg: RunConfig) -> CombinedReward:
    """Instantiate the recipe's reward components (each with its own parameters, weight and deadline)."""
    comps = []
    for i, spec in enumerate(cfg.rewards):
        try:
            fn = build_reward(spec.name, spec.params)
        except (KeyError, TypeError, AttributeError, ImportError, FileNotFoundError, ValueError) as err:
            raise RecipeError(f"rewards[{i}] ({spec.name!r}): {err}") from err
        comps.append(RewardComponent(spec.name, fn, spec.weight, spec.timeout_s, spec.conversational, spec.columns))
    return CombinedReward(comps)


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


class Trainer:
    """Owns the model, optimizer, data cursor, rewards and rollout backend of one run."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, accelerator: Any = None) -> None:
        from accelerate import Accelerator

        from rl_small.models import load_policy

        self.cfg = cfg
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        if cfg.algo.kl_coef > 0 and cfg.model.lora is None:
            raise ValueError("algo.kl_coef > 0 needs model.lora (the reference is the base with the adapter off)")
        # Rewards and data first: a bad reward name or dataset path fails before the model loads.
        self.rewards = build_rewards(cfg)
        try:
            rows, self.data_stats = load_task_rows(cfg.data, cfg.data.split)
        except KeyError as err:  # unknown task: a config error, not a crash
            raise RecipeError(f"data: {err.args[0]}") from err
        seed_everything(cfg.train.seed)
        self.model, self.tok = load_policy(cfg.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
        )
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.train_prompts = build_prompts(rows, self.tok, cfg.data)
        for comp in self.rewards.components:  # e.g. episodic_memory with encoder: policy
            if hasattr(comp.fn, "bind_policy"):
                comp.fn.bind_policy(self.acc.unwrap_model(self.model), self.tok)
        self.backend = make_backend(cfg.rollout, self.acc.unwrap_model(self.model), self.tok)
        self.step_no = 0
        self.cursor = {"epoch": 0, "index": 0}
        if resume:
            self._resume()
        self.tracker = Tracker(run_dir, cfg.train.tensorboard, self.acc.is_main_process)
        self.periodic_eval = self._periodic_eval()

    def _periodic_eval(self) -> Any:
        t = self.cfg.train
        if not (t.eval_every and t.eval_benchmarks):
            return None
        from rl_small.eval.benchmarks import PeriodicEval

        try:
            return PeriodicEval(t.eval_benchmarks, self.tok, t.eval_every, t.eval_limit, t.eval_max_new_tokens,
                                t.eval_data_dir)
        except KeyError as err:
            raise RecipeError(str(err.args[0])) from err

    # ---- data -----------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        rng = random.Random(f"{self.cfg.data.seed}/{epoch}")
        order = list(range(len(self.train_prompts)))
        rng.shuffle(order)
        return order

    def next_prompts(self) -> list[Prompt]:
        """This process's share of the next global batch of a seeded per-epoch permutation.

        The global batch is ``prompts_per_step`` x processes; every process advances the same cursor (which
        is checkpointed) and keeps its own slice, so ranks never train on the same prompt in a step.
        """
        out: list[Prompt] = []
        n = self.cfg.rollout.prompts_per_step * self.acc.num_processes
        while len(out) < n:
            order = self._order(self.cursor["epoch"])
            take = order[self.cursor["index"] : self.cursor["index"] + n - len(out)]
            out.extend(self.train_prompts[i] for i in take)
            self.cursor["index"] += len(take)
            if self.cursor["index"] >= len(order):
                self.cursor = {"epoch": self.cursor["epoch"] + 1, "index": 0}
        return out[self.acc.process_index :: self.acc.num_processes]

    # ---- stages ---------------------------------------------------------------------------------
    def score(self, rollouts: list[Rollout]) -> tuple[list[ScoredRollout], dict[str, float]]:
        columns = batch_columns(rollouts)
        totals, per, metrics = self.rewards(
            [r.text for r in rollouts],
            prompts=[r.prompt.text for r in rollouts],
            completion_ids=[r.completion_ids for r in rollouts],
            group_id=[r.group_id for r in rollouts],
            truncated=[r.truncated for r in rollouts],
            step=self.step_no,
            **columns,
        )
        scored = [
            ScoredRollout(r, t, {k: v[i] for k, v in per.items()}) for i, (r, t) in enumerate(zip(rollouts, totals))
        ]
        metrics["reward/total"] = float(np.mean(totals))
        return scored, metrics

    def advantages(self, scored: list[ScoredRollout]) -> dict[str, float]:
        rewards = torch.tensor([s.reward for s in scored], dtype=torch.float32)
        gids = torch.tensor([s.rollout.group_id for s in scored])
        adv = ADVANTAGES[self.cfg.algo.name](rewards, gids, scale=self.cfg.algo.scale_rewards)
        for s, a in zip(scored, adv.tolist()):
            s.advantage = a
        _, inv, counts = torch.unique(gids, return_inverse=True, return_counts=True)
        spread = torch.zeros(len(counts)).index_add_(0, inv, (adv.abs() > 1e-6).float())
        return {"rollout/zero_adv_groups": float((spread == 0).float().mean())}

    def update(self, scored: list[ScoredRollout]) -> dict[str, float]:
        """Clipped policy-gradient update over micro-batches with gradient accumulation."""
        a, mb = self.cfg.algo, self.cfg.algo.micro_batch_size
        temp = self.cfg.rollout.temperature or 1.0
        rollouts = [s.rollout for s in scored]
        adv_all = torch.tensor([s.advantage for s in scored], dtype=torch.float32)
        n_tok = float(sum(len(r.completion_ids) for r in rollouts))
        norm_len = self.cfg.rollout.max_new_tokens
        chunks = self._micro_batches(rollouts, mb)
        pad = self.tok.pad_token_id
        old: dict[int, torch.Tensor] = {}
        if a.epochs > 1:  # pi_old must be frozen before the first update
            with torch.no_grad():
                for idx in chunks:
                    old[idx[0]] = completion_logprobs(self.model, [rollouts[i] for i in idx], pad, temp)[0]
        stats: dict[str, float] = {"loss/policy": 0.0, "loss/kl": 0.0, "loss/total": 0.0, "loss/clip_frac": 0.0}
        self.model.train()
        for _ in range(a.epochs):
            for idx in chunks:
                batch = [rollouts[i] for i in idx]
                logp, cmask = completion_logprobs(self.model, batch, pad, temp)
                old_logp = old[idx[0]] if idx[0] in old else logp.detach()
                pg, clipped = clipped_policy_loss(logp, old_logp, adv_all[idx], a.clip[0], a.clip[1])
                loss = aggregate(pg, cmask, a.loss_agg, norm_len, len(rollouts), n_tok)
                stats["loss/policy"] += loss.item() / a.epochs
                if a.kl_coef > 0:
                    with torch.no_grad(), self.acc.unwrap_model(self.model).disable_adapter():
                        ref, _ = completion_logprobs(self.model, batch, pad, temp)
                    kl = aggregate(kl_k3(logp, ref), cmask, a.loss_agg, norm_len, len(rollouts), n_tok)
                    loss = loss + a.kl_coef * kl
                    stats["loss/kl"] += kl.item() / a.epochs
                self.acc.backward(loss)
                stats["loss/total"] += loss.item() / a.epochs
                stats["loss/clip_frac"] += (clipped * cmask).sum().item() / n_tok / a.epochs
            norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        stats["optim/grad_norm"] = float(norm)
        stats["optim/lr"] = self.scheduler.get_last_lr()[0]
        return stats

    @staticmethod
    def _micro_batches(rollouts: list[Rollout], size: int) -> list[list[int]]:
        """Indices in chunks of about ``size`` that never split a group (its prompt prefix is shared)."""
        chunks: list[list[int]] = [[]]
        for i, r in enumerate(rollouts):
            new_group = i == 0 or r.group_id != rollouts[i - 1].group_id
            if new_group and len(chunks[-1]) >= size:
                chunks.append([])
            chunks[-1].append(i)
        return chunks

    def step(self) -> dict[str, float]:
        """One optimizer step; returns its metrics."""
        m: dict[str, float] = {}
        r = self.cfg.rollout
        with timer(m, "step"):
            with timer(m, "prompts"):
                prompts = self.next_prompts()
            with timer(m, "rollout"):
                spec = SamplingSpec(r.group_size, r.max_new_tokens, r.temperature, r.top_p)
                rollouts = self.backend.generate(prompts, spec)
            with timer(m, "reward"):
                scored, rm = self.score(rollouts)
            with timer(m, "advantage"):
                am = self.advantages(scored)
            with timer(m, "update"):
                um = self.update(scored)
            self.step_no += 1
            with timer(m, "sync"):
                self.backend.sync(self.acc.unwrap_model(self.model), self.step_no)
        lens = [len(x.completion_ids) for x in rollouts]
        m.update(rm | am | um)
        m["rollout/len_mean"] = float(np.mean(lens))
        m["rollout/clip_frac"] = float(np.mean([x.truncated for x in rollouts]))
        return m

    # ---- loop -----------------------------------------------------------------------------------
    def fit(self) -> None:
        t = self.cfg.train
        bar = Progress(t.steps, self.step_no, enabled=t.progress and self.acc.is_main_process)
        try:
            while self.step_no < t.steps:
                metrics = self.step()
                if self.periodic_eval is not None and self.periodic_eval.due(self.step_no):
                    with timer(metrics, "eval"):
                        metrics.update(self.periodic_eval(self.backend))
                if self.step_no % t.log_every == 0:
                    self.tracker.log(self.step_no, metrics)
                    log.debug("step %d %s", self.step_no, metrics)
                bar.update(metrics)
                if (t.save_every and self.step_no % t.save_every == 0) or self.step_no == t.steps:
                    self.save()
        finally:
            bar.close()
            self.tracker.close()

    def save(self) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            path = save_checkpoint(
                self.run_dir, self.step_no, self.acc.unwrap_model(self.model), self.optimizer, self.scheduler,
                {"cursor": self.cursor, "version": self.backend.version}, self.rewards.state_dict(),
                keep=self.cfg.train.keep_checkpoints,
            )
            log.info("checkpoint %s", path)

    def _resume(self) -> None:
        ckpts = list_checkpoints(self.run_dir)
        if not ckpts:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {str(self.run_dir / 'checkpoints')!r}")
        state = load_checkpoint(ckpts[-1], self.acc.unwrap_model(self.model), self.optimizer, self.scheduler)
        self.step_no = state["step"]
        self.cursor = state["cursor"]
        self.rewards.load_state_dict(state["rewards"])
        self.backend.sync(self.acc.unwrap_model(self.model), state.get("version", self.step_no))
        log.info("resumed from %s (step %d)", ckpts[-1], self.step_no)
