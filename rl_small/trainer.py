"""The training loop: ``step()`` is a list of named, timed stages; ``fit()`` repeats it.

    trainer = Trainer(cfg, run_dir)      # model (+LoRA, + PPO critic), data, rewards, backend; resumes if asked
    trainer.fit()                        # steps, checkpoints, metrics.jsonl, progress bar

Stages of a step: the next groups (rl_small.rollout.stream: prompts -> rollout -> reward, with the group
filters) -> prepare the batch (no-grad old / reference logprobs and critic values, only those the algorithm
uses) -> advantage -> update (epochs x minibatches of policy and value steps) -> sync. Maths: advantages.py,
losses.py; batch: batch.py; critic: critic.py. Runs under Accelerate: ``python -m rl_small.train`` and
``accelerate launch -m rl_small.train``.
"""

from __future__ import annotations

import logging
import random
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from rl_small import metric_names as M
from rl_small.batch import compute_advantages, fill_no_grad, micro_batches, pad_batch
from rl_small.builders import build_rewards, check_run, make_scheduler, seed_everything
from rl_small.checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint
from rl_small.config import RecipeError, RunConfig
from rl_small.critic import Critic
from rl_small.data.domains import build_mixture, load_domains
from rl_small.distributed import World, gather_object, reduce_metrics
from rl_small.eval.benchmarks import PeriodicEval
from rl_small.guards import StopRequest, TrainingInterrupted, guarded_step, step_schedulers
from rl_small.logprobs import completion_logprobs_and_entropy
from rl_small.losses import KL_ESTIMATORS, aggregate, policy_loss, value_loss
from rl_small.rollout import SyncCheck, make_backend
from rl_small.rollout.stream import RolloutStream
from rl_small.tracking import Progress, Tracker, dump_completions, timer, truncate_metrics
from rl_small.types import Group, TrainBatch

log = logging.getLogger(__name__)


class Trainer:
    """Owns the model (+ critic), optimizer, rewards, rollout backend and rollout stream (data cursor, group
    filters' state) of a run."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, accelerator: Any = None) -> None:
        from accelerate import Accelerator

        from rl_small.models import load_policy, resolve_model

        self.cfg = cfg
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        a = cfg.algo
        check_run(cfg, self.acc)
        self.world = World(self.acc)
        # Rewards and data first: a bad reward name or dataset path fails before the model loads.
        domain_rows, self.data_stats = load_domains(cfg.data)
        self.rewards = build_rewards(cfg, domain_rows)  # each reward runs on a sample of the data
        seed_everything(cfg.train.seed)
        self.model, self.tok = load_policy(cfg.model)
        self.policy_params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.policy_params, o.lr, o.betas, o.eps, o.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.critic: Critic | None = None
        if a.name == "ppo":
            assert cfg.model.lora is not None
            self.critic = Critic(
                self.acc.unwrap_model(self.model), cfg.model.lora, a.critic_lr or cfg.optim.lr, cfg.optim.betas,
                cfg.optim.weight_decay, scheduler=lambda opt: make_scheduler(opt, cfg),
            )
        mixture = build_mixture(cfg, domain_rows, self.tok)
        self.train_prompts = [p for d in mixture.names for p in mixture.prompts[d]]
        for comp in self.rewards.components:  # e.g. episodic_memory with encoder: policy
            if hasattr(comp.fn, "bind_policy"):
                comp.fn.bind_policy(self.acc.unwrap_model(self.model), self.tok)
        lora = cfg.model.lora
        self.backend = make_backend(
            cfg.rollout, self.acc.unwrap_model(self.model), self.tok, model_name=resolve_model(cfg.model.name),
            lora_rank=lora.r if lora else None, run_dir=run_dir, is_main=self.acc.is_main_process,
            rank=self.world.rank, world=self.world.size,
        )
        self.stream = RolloutStream(cfg, mixture, self.backend, self.rewards, self.world)
        self.step_no = 0
        self.sync_check = SyncCheck.from_config(cfg.rollout)  # alarms on stale sampler weights
        if resume:
            self._resume()
        self.tracker = Tracker(run_dir, cfg.train.trackers, self.acc.is_main_process)
        self.periodic_eval = PeriodicEval.from_config(cfg.train, self.tok)  # train.eval_every: benchmarks

    # ---- stages ---------------------------------------------------------------------------------
    def make_batch(self, groups: list[Group]) -> TrainBatch:
        """The step's groups as padded tensors, with the no-grad passes the algorithm uses (pi_old, pi_ref,
        critic values; none for one-epoch GRPO without KL)."""
        batch = pad_batch(groups, self.stream.f.overlong_filter)  # the overlong filter: the stream's options
        temp, pad = self.cfg.rollout.temperature or 1.0, self.tok.pad_token_id
        fill_no_grad(batch, self.model, self.critic, self.cfg.algo, pad, temp, self.acc.unwrap_model(self.model))
        return batch

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """``epochs`` x ``minibatches`` optimizer steps (groups shuffled per epoch when split), each over
        micro-batches with gradient accumulation; the critic (ppo) steps alongside the policy."""
        a, groups = self.cfg.algo, batch.group_rows
        if a.minibatches > len(groups):
            raise RecipeError(f"algo.minibatches={a.minibatches} exceeds the {len(groups)} groups of the batch")
        stats = dict.fromkeys((M.LOSS_POLICY, M.LOSS_KL, M.LOSS_TOTAL, M.LOSS_CLIP_FRAC, M.OPTIM_GRAD_NORM), 0.0)
        self.model.train()
        n_opt = a.epochs * a.minibatches
        for epoch in range(a.epochs):
            order = list(groups)
            if a.minibatches > 1:
                random.Random(f"{self.cfg.train.seed}/{self.step_no}/{epoch}").shuffle(order)
            for k in range(a.minibatches):
                part = order[k * len(order) // a.minibatches : (k + 1) * len(order) // a.minibatches]
                self._minibatch_step(batch, sorted(part), stats, n_opt)
        step_schedulers(self, stats, n_opt)  # rl_small.guards: not after a step whose updates were all skipped
        stats[M.OPTIM_LR] = self.scheduler.get_last_lr()[0]
        return stats

    def _minibatch_step(self, batch: TrainBatch, part: list[list[int]], stats: dict[str, float], n_opt: int) -> None:
        """One optimizer step on the groups ``part`` (their rows, in batch order); per-token terms are normalised
        by this minibatch's sequence / token counts, so the micro-batches add up to the minibatch loss (metrics:
        mean per step)."""
        sel = torch.tensor([i for rows in part for i in rows])
        keep = batch.loss_weight[sel]
        # counts over every process's minibatch, divided by the process count because DDP averages gradients:
        # each process's loss is then its share of the global-batch loss (token_mean over all tokens, etc.)
        counts = torch.stack([keep.sum(), (batch.mask[sel] * keep.unsqueeze(-1)).sum(), batch.mask[sel].sum()])
        n_seq, n_tok, n_tok_v = (self.world.sum(counts.double()) / self.world.size).tolist()

        def add(key: str, value: float) -> None:
            stats[key] = stats.get(key, 0.0) + value / n_opt

        for chunk in micro_batches(part, self.cfg.algo.micro_batch_size):
            rows, rs = torch.tensor(chunk), [batch.rollouts[i] for i in chunk]
            loss = self._policy_loss(batch, rows, rs, n_seq, n_tok, add)
            self.acc.backward(loss)
            add(M.LOSS_TOTAL, loss.item())
            if self.critic is not None:
                self._value_loss(batch, rows, rs, n_tok_v, add)
        guarded_step(self, stats, add)  # rl_small.guards: clip, then step, or skip a non-finite step on every rank

    def _policy_loss(self, batch: TrainBatch, rows: torch.Tensor, rs: list[Any], n_seq: float, n_tok: float,
                     add: Any) -> torch.Tensor:
        """The micro-batch ``rows``' policy loss (surrogate, + KL in the loss, - entropy bonus, as configured)."""
        a, pad, norm_len = self.cfg.algo, self.tok.pad_token_id, self.cfg.rollout.max_new_tokens
        ent_on = a.entropy_coef > 0 or (a.entropy_log_every > 0 and self.step_no % a.entropy_log_every == 0)
        logp, _, ent = completion_logprobs_and_entropy(self.model, rs, pad, self.cfg.rollout.temperature or 1.0,
                                                       ent_on, a.entropy_coef > 0)
        w, dev = logp.shape[1], logp.device  # the batch lives on the CPU, the model's outputs on its device

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t[rows, :w].to(dev)

        m = cut(batch.mask) * batch.loss_weight[rows].unsqueeze(-1).to(dev)

        def agg(x: torch.Tensor) -> torch.Tensor:
            return aggregate(x, m, a.loss_agg, norm_len, n_seq, n_tok)

        assert batch.advantages is not None
        old = cut(batch.old_logp) if batch.old_logp is not None else logp.detach()
        samp = cut(batch.sampler_logp) if batch.sampler_logp is not None else None
        pg, pm = policy_loss(logp, old, samp, cut(batch.advantages), m, a)  # rl_small.policy_losses
        for key, per_token in pm.items():  # clip fractions, sampler/trainer mismatch: token means
            add(key, float((per_token * m).sum()) / max(n_tok, 1.0))
        loss = agg(pg)
        add(M.LOSS_POLICY, loss.item())
        if batch.ref_logp is not None:  # a KL is in the loss or logged
            kl = agg(KL_ESTIMATORS[a.kl_estimator](logp, cut(batch.ref_logp)))
            add(M.POLICY_KL, kl.item())
            if a.kl_mode == "loss" and a.kl_coef > 0:
                loss = loss + a.kl_coef * kl
                add(M.LOSS_KL, kl.item())
        if a.entropy_coef > 0:
            loss = loss - a.entropy_coef * agg(ent)
        if ent is not None:
            add(M.POLICY_ENTROPY, float((ent.detach() * m).sum()) / max(n_tok, 1.0))
        return loss

    def _value_loss(self, batch: TrainBatch, rows: torch.Tensor, rs: list[Any], n_tok_v: float, add: Any) -> None:
        """The critic's clipped value loss on the micro-batch ``rows`` (ppo), backpropagated."""
        assert self.critic is not None and batch.old_values is not None and batch.returns is not None
        v = self.critic.values(rs, self.tok.pad_token_id)
        w, dev = v.shape[1], v.device
        vm, old, ret = (t[rows, :w].to(dev) for t in (batch.mask, batch.old_values, batch.returns))
        vl, vclip = value_loss(v, old, ret, self.cfg.algo.value_clip)
        vloss = aggregate(vl, vm, "token_mean", num_tokens=n_tok_v)
        self.acc.backward(vloss)
        add(M.LOSS_VALUE, vloss.item())
        add(M.LOSS_VALUE_CLIP_FRAC, float((vclip * vm).sum()) / max(n_tok_v, 1.0))

    def step(self) -> dict[str, float]:
        """One training step (``epochs`` x ``minibatches`` optimizer steps); returns its metrics."""
        m: dict[str, float] = {}
        with timer(m, M.TIME_STEP):
            groups = self.stream.next_groups(self.step_no, m)  # timing/prompts, timing/rollout, timing/reward
            with timer(m, M.TIME_PREPARE):
                batch = self.make_batch(groups)
            with timer(m, M.TIME_ADVANTAGE):
                m.update(compute_advantages(batch, self.cfg.algo, self.world.sum))
            with timer(m, M.TIME_UPDATE):
                m.update(self.update(batch))
            m.update(self.sync_check(m, batch.rollouts, self.step_no, self.world))
            self.step_no += 1
            dump_completions(self, batch, groups)  # train.log_completions_every: completions.jsonl
            if self.step_no % self.cfg.rollout.sync_every == 0:
                with timer(m, M.TIME_SYNC):
                    self.sync()
                m.update(getattr(self.backend, "metrics", {}))  # vLLM: rollout/sync_merged, auto's timings
        return m

    # ---- loop -----------------------------------------------------------------------------------
    def fit(self) -> None:
        t = self.cfg.train
        bar = Progress(t.steps, self.step_no, enabled=t.progress and self.acc.is_main_process)
        stop = StopRequest(self.world)  # Ctrl-C: finish the step, save, raise TrainingInterrupted
        try:
            while self.step_no < t.steps:
                metrics = reduce_metrics(self.acc, self.step())
                if self.periodic_eval is not None and self.periodic_eval.due(self.step_no):
                    with timer(metrics, M.TIME_EVAL):
                        metrics.update(self.periodic_eval(self.backend))
                if self.step_no % t.log_every == 0:
                    self.tracker.log(self.step_no, metrics)
                    log.debug("step %d %s", self.step_no, metrics)
                bar.update(metrics)
                stopping = stop.agreed()  # one collective per step: every rank stops after the same step
                if stopping or (t.save_every and self.step_no % t.save_every == 0) or self.step_no == t.steps:
                    self.save()
                if stopping:
                    raise TrainingInterrupted(self.step_no, self.run_dir)
            if self.backend.version != self.step_no:  # sync_every > 1: what follows uses the final policy
                self.sync()
        finally:
            stop.close()
            bar.close()
            self.tracker.close()

    def sync(self) -> None:
        """Push the policy to the sampler as version ``step_no`` (every process waits until it is served)."""
        self.backend.sync(self.acc.unwrap_model(self.model), self.step_no)
        self.acc.wait_for_everyone()

    def base_policy(self) -> AbstractContextManager[Any]:
        """A block in which the policy is the base model (LoRA adapter disabled; full fine-tuning: as it is)."""
        return self.acc.unwrap_model(self.model).disable_adapter() if self.cfg.model.lora else nullcontext()

    @property
    def is_main(self) -> bool:
        """Whether this is the main process (the one that writes files)."""
        return bool(self.acc.is_main_process)

    def save_adapter(self, path: Path) -> bool:
        """Write the trained LoRA adapter to ``path`` (main process); False when there is none (full fine-tuning)."""
        model = self.acc.unwrap_model(self.model)
        if self.is_main and hasattr(model, "peft_config"):
            model.save_pretrained(path)
            return True
        return False

    def save(self) -> None:
        self.acc.wait_for_everyone()
        # every rank's own RNG and reward state (an episodic memory holds that rank's rollouts)
        ranks = gather_object(self.acc, [{"rng": rng_state(), "rewards": self.rewards.state_dict()}])
        if self.acc.is_main_process:
            stream = self.stream.state_dict()  # the cursor to trainer_state.json, the filters' statistics to state.pt
            extra: dict[str, Any] = {k: v for k, v in stream.items() if k != "cursor"}
            if self.critic is not None:
                extra["critic"] = self.critic.state_dict()
            path = save_checkpoint(
                self.run_dir, self.step_no, self.acc.unwrap_model(self.model), self.optimizer, self.scheduler,
                {"cursor": stream["cursor"], "version": self.backend.version}, self.rewards.state_dict(),
                keep=self.cfg.train.keep_checkpoints, extra=extra, ranks=ranks,
            )
            log.info("checkpoint %s", path)

    def _resume(self) -> None:
        ckpts = list_checkpoints(self.run_dir)
        if not ckpts:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {str(self.run_dir / 'checkpoints')!r}")
        state = load_checkpoint(ckpts[-1], self.acc.unwrap_model(self.model), self.optimizer, self.scheduler,
                                self.acc.process_index, self.acc.num_processes)
        self.step_no = state["step"]
        for name in ("metrics.jsonl", "completions.jsonl"):  # redone steps are logged again
            truncate_metrics(self.run_dir, self.step_no, self.acc.is_main_process, name)
        extra = state["extra"]
        self.stream.load_state_dict({**extra, "cursor": state["cursor"]})
        self.rewards.load_state_dict(state["rewards"])
        if self.critic is not None:
            if "critic" not in extra:
                raise RecipeError(f"checkpoint {str(ckpts[-1])!r} has no critic state: it is not from a ppo run")
            self.critic.load_state_dict(extra["critic"])
        self.backend.sync(self.acc.unwrap_model(self.model), state.get("version", self.step_no))
        log.info("resumed from %s (step %d)", ckpts[-1], self.step_no)
