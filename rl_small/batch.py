"""From scored groups to a per-token ``TrainBatch``: padding, the no-grad passes, and the advantages.

    batch = pad_batch(groups, overlong_filter=False)                 # mask, rewards, group ids, loss weights
    fill_no_grad(batch, model, critic, cfg.algo, pad_id, temperature)  # pi_old / pi_ref / old values as needed
    metrics = compute_advantages(batch, cfg.algo)                    # batch.advantages (+ batch.returns for ppo)

``compute_advantages`` is the one place that maps ``algo.name`` (and the KL-in-reward option) to the pure
estimators of rl_small.advantages; the trainer only calls these three functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from rl_small.advantages import ADVANTAGES, last_token_rewards, masked_whiten
from rl_small.logprobs import completion_logprobs
from rl_small.losses import KL_ESTIMATORS
from rl_small.sampling import overlong_keep
from rl_small.types import Group, TrainBatch, flat_rollouts

if TYPE_CHECKING:
    from rl_small.config import AlgoConfig
    from rl_small.critic import Critic


def micro_batches(group_rows: list[list[int]], size: int) -> list[list[int]]:
    """Row indices in chunks of about ``size`` that never split a group (its prompt prefix is shared):
    ``group_rows`` are the rows of each group in batch order (``TrainBatch.group_rows``, or a subset of them)."""
    chunks: list[list[int]] = [[]]
    for rows in group_rows:
        if chunks[-1] and len(chunks[-1]) >= size:
            chunks.append([])
        chunks[-1].extend(rows)
    return chunks


def pad_batch(groups: list[Group], overlong_filter: bool = False) -> TrainBatch:
    """(N, T) completion mask (T = longest completion), rewards (N,), group ids (N,: the group's place in
    ``groups``), the policy-loss weight (N,) (0 for filler groups, and with overlong filtering for truncated
    completions), and the sampler's logprobs (N, T) when the backend reported them for every rollout."""
    rollouts = flat_rollouts(groups)
    sizes = [len(g.rollouts) for g in groups]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    group_rows = [list(range(s, s + k)) for s, k in zip(starts, sizes)]
    n, width = len(rollouts), max(max(len(r.completion_ids) for r in rollouts), 1)
    mask = torch.zeros(n, width)
    for i, r in enumerate(rollouts):
        mask[i, : len(r.completion_ids)] = 1
    keep = overlong_keep([r.truncated for r in rollouts]) if overlong_filter else torch.ones(n)
    keep = keep * torch.tensor([g.weight for g in groups for _ in g.rollouts], dtype=keep.dtype)
    rewards = torch.tensor([x for g in groups for x in g.rewards], dtype=torch.float32)
    gids = torch.tensor([k for k, g in enumerate(groups) for _ in g.rollouts])
    batch = TrainBatch(rollouts, group_rows, rewards, gids, mask, keep)
    if all(r.sampler_logprobs is not None and len(r.sampler_logprobs) == len(r.completion_ids) for r in rollouts):
        batch.sampler_logp = torch.zeros(n, width)
        for i, r in enumerate(rollouts):
            batch.sampler_logp[i, : len(r.completion_ids)] = torch.tensor(r.sampler_logprobs or [])
    return batch


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run the block with ``model`` in eval mode (no dropout) and restore its train/eval flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def fill_no_grad(
    batch: TrainBatch,
    model: Any,
    critic: Critic | None,
    algo: AlgoConfig,
    pad_id: int,
    temperature: float,
    peft_model: Any = None,
) -> None:
    """The passes before any update, each only when needed: log pi_old (several optimizer steps per batch, or a
    KL reward), log pi_ref (any KL: ``peft_model`` with its adapters disabled), the critic's values (ppo).
    ``model`` may be Accelerate-wrapped; ``peft_model`` is the unwrapped PEFT model (default: ``model``).

    The passes run in eval mode: no dropout mask (LoRA ``dropout``, attention dropout) is drawn, so they are
    deterministic, and pi_old, pi_ref and the old values are the deterministic policy / critic, as generation
    (also eval mode) sampled from. The update forward keeps dropout on (train mode, as TRL and verl do); with
    ``dropout = 0`` both are the same function and the first optimizer step's ratio pi/pi_old is exactly 1.
    With ``dropout > 0`` the update's pi is a dropout-noised pi_old at the first step, so the ratio is noise
    around 1 that the PPO clip bounds (when no pi_old is needed, one epoch and minibatch, the trainer uses the
    detached current logprobs and the ratio is exactly 1 with any dropout)."""
    need_ref = algo.kl_coef > 0 or algo.log_kl
    need_old = algo.epochs > 1 or algo.minibatches > 1 or (algo.kl_coef > 0 and algo.kl_mode == "reward")
    n, width = batch.mask.shape
    batch.old_logp = torch.zeros(n, width) if need_old else None
    batch.ref_logp = torch.zeros(n, width) if need_ref else None
    batch.old_values = torch.zeros(n, width) if critic is not None else None
    if not (need_old or need_ref or critic is not None):
        return
    peft_model = model if peft_model is None else peft_model
    with torch.no_grad(), eval_mode(model):  # a DDP wrapper passes the mode on to the PEFT model
        for idx in micro_batches(batch.group_rows, algo.micro_batch_size):
            chunk, rows = [batch.rollouts[i] for i in idx], torch.tensor(idx)
            if batch.old_logp is not None:
                lp, _ = completion_logprobs(model, chunk, pad_id, temperature)
                batch.old_logp[rows, : lp.shape[1]] = lp.cpu()
            if batch.ref_logp is not None:
                with peft_model.disable_adapter():
                    lp, _ = completion_logprobs(model, chunk, pad_id, temperature)
                batch.ref_logp[rows, : lp.shape[1]] = lp.cpu()
            if critic is not None and batch.old_values is not None:
                v = critic.values(chunk, pad_id)
                batch.old_values[rows, : v.shape[1]] = v.cpu()


def compute_advantages(
    batch: TrainBatch, algo: AlgoConfig, sum_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> dict[str, float]:
    """Set ``batch.advantages`` (N, T) (and ``batch.returns`` for ppo) with the estimator ``algo.name``.
    Batch-wide statistics (ppo's whitening, reinforce_pp's normalisation) sum over the processes with ``sum_fn``
    (rl_small.distributed.World.sum); group statistics need none, a group stays on one process.

    With ``kl_mode: reward`` the per-token KL of pi_old to pi_ref (estimator ``kl_estimator``) becomes a
    penalty: -beta KL_t per token for ppo (as token rewards into GAE) and reinforce_pp (its reward-to-go), and
    -beta sum_t KL_t on the sequence reward for the group estimators.
    """
    m = batch.mask
    out: dict[str, float] = {}
    kl_tok = None
    if algo.kl_coef > 0 and algo.kl_mode == "reward":
        if batch.old_logp is None or batch.ref_logp is None:
            raise ValueError("kl_mode=reward needs batch.old_logp and batch.ref_logp (run fill_no_grad first)")
        kl_tok = KL_ESTIMATORS[algo.kl_estimator](batch.old_logp, batch.ref_logp) * m
        out["reward/kl_penalty"] = algo.kl_coef * float(kl_tok.sum(-1).mean())
    if algo.name == "ppo":
        if batch.old_values is None:
            raise ValueError("ppo needs batch.old_values (run fill_no_grad with the critic first)")
        tok_r = last_token_rewards(batch.rewards, m)
        if kl_tok is not None:
            tok_r = tok_r - algo.kl_coef * kl_tok
        adv, batch.returns = ADVANTAGES["gae"](batch.old_values, tok_r, m, gamma=algo.gamma, lam=algo.lam)
        adv = masked_whiten(adv, m, sum_fn=sum_fn) if algo.whiten_advantages else adv
        values, returns, n_tok = (sum_fn or (lambda t: t))(torch.stack([(batch.old_values * m).sum(),
                                                                         batch.returns.sum(), m.sum()])).tolist()
        out["critic/value_mean"], out["critic/return_mean"] = values / n_tok, returns / n_tok
    elif algo.name == "reinforce_pp":
        adv = ADVANTAGES["reinforce_pp"](
            batch.rewards, batch.group_ids, mask=m, kl=kl_tok, kl_coef=algo.kl_coef,
            group_baseline=algo.group_baseline, sum_fn=sum_fn,
        )
    else:
        r = batch.rewards if kl_tok is None else batch.rewards - algo.kl_coef * kl_tok.sum(-1)
        adv = ADVANTAGES[algo.name](r, batch.group_ids, scale=getattr(algo, "scale_rewards", True)).unsqueeze(-1) * m
    batch.advantages = adv
    _, inv, counts = torch.unique(batch.group_ids, return_inverse=True, return_counts=True)
    spread = torch.zeros(len(counts)).index_add_(0, inv, ((adv.abs() * m).sum(-1) > 1e-6).float())
    out["rollout/zero_adv_groups"] = float((spread == 0).float().mean())
    return out
