"""The training loop: ``step()`` is a list of named, timed stages; ``fit()`` repeats it.

    trainer = Trainer(cfg, run_dir)      # model (+LoRA, + PPO critic), data, rewards, backend; resumes if asked
    trainer.fit()                        # steps, checkpoints, metrics.jsonl, progress bar

Stages of a step: prompts -> rollout -> reward (repeated by dynamic sampling until the batch is full) ->
prepare (no-grad old / reference logprobs and critic values) -> advantage -> update (epochs x minibatches of
policy and value steps) -> sync. Maths: advantages.py, losses.py; batch selection: sampling.py; critic:
critic.py. Runs under Accelerate: ``python -m rl_small.train`` and ``accelerate launch -m rl_small.train``.
"""

from __future__ import annotations

import copy
import logging
import random
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rl_small.batch import compute_advantages, fill_no_grad, group_indices, micro_batches, pad_batch
from rl_small.builders import build_rewards, check_run, make_scheduler, seed_everything
from rl_small.checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint
from rl_small.config import RecipeError, RunConfig
from rl_small.critic import Critic
from rl_small.data.domains import build_mixture, load_domains
from rl_small.distributed import World, gather_object, reduce_metrics
from rl_small.guards import StopRequest, TrainingInterrupted, guarded_step, step_schedulers
from rl_small.logprobs import completion_logprobs_and_entropy
from rl_small.losses import KL_ESTIMATORS, aggregate, policy_loss, value_loss
from rl_small.rollout import SamplingSpec, SyncCheck, make_backend
from rl_small.sampling import PassRateTracker, dynamic_sample, group_signal, merge_round_metrics
from rl_small.tracking import Progress, Tracker, dump_completions, timer, truncate_metrics
from rl_small.types import Prompt, Rollout, ScoredRollout, TrainBatch, batch_columns

log = logging.getLogger(__name__)


class Trainer:
    """Owns the model (+ critic), optimizer, data cursor, rewards, sampling state and rollout backend of a run."""

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
        self.pass_rates = PassRateTracker() if a.difficulty_filter else None
        self.mixture = build_mixture(cfg, domain_rows, self.tok)
        self.train_prompts = [p for d in self.mixture.names for p in self.mixture.prompts[d]]
        for comp in self.rewards.components:  # e.g. episodic_memory with encoder: policy
            if hasattr(comp.fn, "bind_policy"):
                comp.fn.bind_policy(self.acc.unwrap_model(self.model), self.tok)
        if cfg.rollout.async_generation and cfg.rollout.backend not in ("vllm_server", "auto"):
            raise RecipeError(f"rollout.async_generation needs the vllm_server backend, not {cfg.rollout.backend!r}")
        lora = cfg.model.lora
        self.backend = make_backend(
            cfg.rollout, self.acc.unwrap_model(self.model), self.tok, model_name=resolve_model(cfg.model.name),
            lora_rank=lora.r if lora else None, run_dir=run_dir, is_main=self.acc.is_main_process,
            rank=self.world.rank, world=self.world.size,
        )
        if cfg.rollout.async_generation and not getattr(self.backend, "thread_safe", False):
            self.backend.close()
            raise RecipeError("rollout.async_generation needs the vllm_server backend (vllm installed), not "
                              f"{type(self.backend).__name__}")
        self._prefetch: tuple[list[Prompt], Future[list[Rollout]]] | None = None
        self._cursor_snapshot: dict[str, Any] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.step_no = 0
        self._skipped = 0
        self.sync_check = SyncCheck.from_config(cfg.rollout)  # alarms on stale sampler weights
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
    def next_prompts(self, n: int | None = None) -> list[Prompt]:
        """This process's share of the next ``n`` (default ``prompts_per_step``) x processes prompts
        (rl_small.data.mixture: seeded per-epoch permutations, per domain when data.mix is set).

        Every process advances the same cursors (which are checkpointed) and keeps its own slice, so ranks never
        train on the same prompt in a step. With the difficulty filter, prompts whose running pass rate is 0 or
        1 are passed over (and counted); a whole epoch of them is an error, not an endless loop.
        """
        want = (n or self.cfg.rollout.prompts_per_step) * self.acc.num_processes
        skip = self.pass_rates.skip if self.pass_rates is not None else None
        out, skipped = self.mixture.draw(want, (lambda p: skip(p.id)) if skip else None)
        self._skipped += skipped
        return out[self.acc.process_index :: self.acc.num_processes]

    # ---- stages ---------------------------------------------------------------------------------
    def score(self, rollouts: list[Rollout]) -> tuple[list[ScoredRollout], dict[str, float]]:
        columns = batch_columns(rollouts)
        totals, per, metrics = self.rewards.agreed(self.world,
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

    def collect(self, m: dict[str, float]) -> list[ScoredRollout]:
        """Generate and score this step's groups (stages prompts, rollout, reward, timed into ``m``); with
        dynamic sampling, tied groups are dropped and more prompts drawn (rl_small.sampling). The reward
        metrics average over every generated completion of every round, not only the kept ones."""
        r, a = self.cfg.rollout, self.cfg.algo
        spec = SamplingSpec(r.group_size, r.max_new_tokens, r.temperature, r.top_p, r.ignore_eos)
        rounds: list[tuple[int, dict[str, float]]] = []

        def draw(n: int) -> list[ScoredRollout]:
            t: dict[str, float] = {}
            pre = self._prefetch if self._prefetch is not None and len(self._prefetch[0]) == n else None
            with timer(t, "prompts"):
                prompts = pre[0] if pre else self.next_prompts(n)
            with timer(t, "rollout"):
                rollouts = pre[1].result() if pre else self.backend.generate(prompts, spec)
                self._prefetch = None if pre else self._prefetch
            with timer(t, "reward"):
                scored, rm = self.score(rollouts)
            m.update({k: m.get(k, 0.0) + v for k, v in t.items()})
            rounds.append((len(scored), rm))
            if self.pass_rates is not None:  # every process counts every process's completions: same skips
                comps = [s.components.get(a.pass_reward) for s in scored]
                seen = self.world.gather([(s.rollout.prompt.id, None if c is None else c >= a.pass_threshold)
                                          for s, c in zip(scored, comps)])
                self.pass_rates.update([pid for pid, _ in seen], [ok for _, ok in seen])
            return scored

        self._skipped = 0
        if a.dynamic_sampling:
            signal = group_signal(a, [x.name for x in self.cfg.rewards])
            scored, sm = dynamic_sample(draw, r.prompts_per_step, a.max_sampling_rounds, self.world, signal)
        else:
            scored, sm = draw(r.prompts_per_step), {}
        m.update(merge_round_metrics(rounds) | sm)
        if self.mixture.dynamic is not None:  # the domain weights follow the whole global batch on every process
            seen = self.world.gather([(s.rollout.prompt.columns["domain"], s.reward) for s in scored if s.weight])
            m.update(self.mixture.observe([d for d, _ in seen], [rw for _, rw in seen]))
        if self.pass_rates is not None:
            m["sampling/skipped_prompts"] = float(self._skipped)
        if r.async_generation and self.step_no + 1 < self.cfg.train.steps:  # next step's rollouts, during update
            self._cursor_snapshot = copy.deepcopy(self.mixture.state_dict())  # what a checkpoint resumes from
            nxt = self.next_prompts(r.prompts_per_step)
            self._prefetch = (nxt, self._pool.submit(self.backend.generate, nxt, spec))
        return scored

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """``epochs`` x ``minibatches`` optimizer steps (groups shuffled per epoch when split), each over
        micro-batches with gradient accumulation; the critic (ppo) steps alongside the policy."""
        a = self.cfg.algo
        groups = group_indices(batch.rollouts)
        if a.minibatches > len(groups):
            raise RecipeError(f"algo.minibatches={a.minibatches} exceeds the {len(groups)} groups of the batch")
        stats = dict.fromkeys(("loss/policy", "loss/kl", "loss/total", "loss/clip_frac", "optim/grad_norm"), 0.0)
        self.model.train()
        n_opt = a.epochs * a.minibatches
        for epoch in range(a.epochs):
            order = list(groups)
            if a.minibatches > 1:
                random.Random(f"{self.cfg.train.seed}/{self.step_no}/{epoch}").shuffle(order)
            for k in range(a.minibatches):
                part = order[k * len(order) // a.minibatches : (k + 1) * len(order) // a.minibatches]
                self._minibatch_step(batch, sorted(i for g in part for i in g), stats, n_opt)
        step_schedulers(self, stats, n_opt)  # rl_small.guards: not after a step whose updates were all skipped
        stats["optim/lr"] = self.scheduler.get_last_lr()[0]
        return stats

    def _minibatch_step(self, batch: TrainBatch, idx: list[int], stats: dict[str, float], n_opt: int) -> None:
        """One optimizer step on the sequences ``idx``; per-token terms are normalised by this minibatch's
        sequence / token counts, so the micro-batches add up to the minibatch loss (metrics: mean per step)."""
        a, pad, norm_len = self.cfg.algo, self.tok.pad_token_id, self.cfg.rollout.max_new_tokens
        temp = self.cfg.rollout.temperature or 1.0
        sel = torch.tensor(idx)
        keep = batch.loss_weight[sel]
        # counts over every process's minibatch, divided by the process count because DDP averages gradients:
        # each process's loss is then its share of the global-batch loss (token_mean over all tokens, etc.)
        counts = torch.stack([keep.sum(), (batch.mask[sel] * keep.unsqueeze(-1)).sum(), batch.mask[sel].sum()])
        n_seq, n_tok, n_tok_v = (self.world.sum(counts.double()) / self.world.size).tolist()
        assert batch.advantages is not None

        def add(key: str, value: float) -> None:
            stats[key] = stats.get(key, 0.0) + value / n_opt

        for chunk in micro_batches([batch.rollouts[i] for i in idx], a.micro_batch_size):
            rows = sel[chunk]
            rs = [batch.rollouts[i] for i in rows.tolist()]
            ent_on = a.entropy_coef > 0 or (a.entropy_log_every > 0 and self.step_no % a.entropy_log_every == 0)
            logp, _, ent = completion_logprobs_and_entropy(self.model, rs, pad, temp, ent_on, a.entropy_coef > 0)
            w, dev = logp.shape[1], logp.device  # the batch lives on the CPU, the model's outputs on its device

            def cut(t: torch.Tensor, w: int = w, dev: torch.device = dev, rows: torch.Tensor = rows) -> torch.Tensor:
                return t[rows, :w].to(dev)

            m = cut(batch.mask) * batch.loss_weight[rows].unsqueeze(-1).to(dev)

            def agg(x: torch.Tensor, m: torch.Tensor = m) -> torch.Tensor:
                return aggregate(x, m, a.loss_agg, norm_len, n_seq, n_tok)

            old = cut(batch.old_logp) if batch.old_logp is not None else logp.detach()
            samp = cut(batch.sampler_logp) if batch.sampler_logp is not None else None
            pg, pm = policy_loss(logp, old, samp, cut(batch.advantages), m, a)  # rl_small.policy_losses
            for key, per_token in pm.items():  # clip fractions, sampler/trainer mismatch: token means
                add(key, float((per_token * m).sum()) / max(n_tok, 1.0))
            loss = agg(pg)
            add("loss/policy", loss.item())
            if batch.ref_logp is not None:
                kl = agg(KL_ESTIMATORS[a.kl_estimator](logp, cut(batch.ref_logp)))
                add("policy/kl", kl.item())
                if a.kl_mode == "loss" and a.kl_coef > 0:
                    loss = loss + a.kl_coef * kl
                    add("loss/kl", kl.item())
            if a.entropy_coef > 0:
                loss = loss - a.entropy_coef * agg(ent)
            if ent is not None:
                add("policy/entropy", float((ent.detach() * m).sum()) / max(n_tok, 1.0))
            self.acc.backward(loss)
            add("loss/total", loss.item())
            if self.critic is not None:
                assert batch.old_values is not None and batch.returns is not None
                vm = cut(batch.mask)
                v = self.critic.values(rs, pad)
                vl, vclip = value_loss(v, cut(batch.old_values), cut(batch.returns), a.value_clip)
                vloss = aggregate(vl, vm, "token_mean", num_tokens=n_tok_v)
                self.acc.backward(vloss)
                add("loss/value", vloss.item())
                add("loss/value_clip_frac", float((vclip * vm).sum()) / max(n_tok_v, 1.0))
        guarded_step(self, stats, add)  # rl_small.guards: clip, then step, or skip a non-finite step on every rank

    def step(self) -> dict[str, float]:
        """One training step (``epochs`` x ``minibatches`` optimizer steps); returns its metrics."""
        m: dict[str, float] = {}
        with timer(m, "step"):
            scored = self.collect(m)
            with timer(m, "prepare"):
                batch = pad_batch(scored, self.cfg.algo.overlong_filter)
                temp, pad = self.cfg.rollout.temperature or 1.0, self.tok.pad_token_id
                unwrapped = self.acc.unwrap_model(self.model)
                fill_no_grad(batch, self.model, self.critic, self.cfg.algo, pad, temp, unwrapped)
            with timer(m, "advantage"):
                m.update(compute_advantages(batch, self.cfg.algo, self.world.sum))
            with timer(m, "update"):
                m.update(self.update(batch))
            m.update(self.sync_check(m, scored, self.step_no, self.world))
            self.step_no += 1
            dump_completions(self, batch, scored)  # train.log_completions_every: completions.jsonl
            if self.step_no % self.cfg.rollout.sync_every == 0:
                with timer(m, "sync"):
                    self.sync()
                m.update(getattr(self.backend, "metrics", {}))  # vLLM: rollout/sync_merged, auto's timings
        real = [s.rollout for s in scored if s.weight]  # not the filler groups of dynamic sampling
        m["rollout/len_mean"] = float(np.mean([len(r.completion_ids) for r in real]))
        m["rollout/truncated_frac"] = float(np.mean([r.truncated for r in real]))
        if self.cfg.algo.overlong_filter:
            m["sampling/overlong_masked"] = m["rollout/truncated_frac"]
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
                    with timer(metrics, "eval"):
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

    def save(self) -> None:
        self.acc.wait_for_everyone()
        # every rank's own RNG and reward state (an episodic memory holds that rank's rollouts)
        ranks = gather_object(self.acc, [{"rng": rng_state(), "rewards": self.rewards.state_dict()}])
        if self.acc.is_main_process:
            extra: dict[str, Any] = {"critic": self.critic.state_dict()} if self.critic is not None else {}
            if self.pass_rates is not None:
                extra["pass_rates"] = self.pass_rates.state_dict()
            path = save_checkpoint(
                self.run_dir, self.step_no, self.acc.unwrap_model(self.model), self.optimizer, self.scheduler,
                {"cursor": self._cursor_snapshot if self._prefetch else self.mixture.state_dict(),
                 "version": self.backend.version}, self.rewards.state_dict(),
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
        self.mixture.load_state_dict(state["cursor"])
        self.rewards.load_state_dict(state["rewards"])
        extra = state["extra"]
        if self.critic is not None:
            if "critic" not in extra:
                raise RecipeError(f"checkpoint {str(ckpts[-1])!r} has no critic state: it is not from a ppo run")
            self.critic.load_state_dict(extra["critic"])
        if self.pass_rates is not None and "pass_rates" in extra:
            self.pass_rates.load_state_dict(extra["pass_rates"])
        self.backend.sync(self.acc.unwrap_model(self.model), state.get("version", self.step_no))
        log.info("resumed from %s (step %d)", ckpts[-1], self.step_no)
