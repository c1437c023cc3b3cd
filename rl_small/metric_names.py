"""The names of the metrics a run logs (metrics.jsonl, TensorBoard), in one place.

    from rl_small import metric_names as M
    m[M.REWARD_TOTAL] = ...;  with timer(m, M.TIME_ROLLOUT): ...;  M.reward(comp.name);  M.is_metric(key)

The trainer, the rollout stream, the progress bar, ``rl-small report`` and the benches read and write these
constants; the strings are what users' dashboards follow, so they do not change. Names with a variable part
(a reward's, a domain's, a benchmark's name) are built by the functions at the end. Units: means are per
completion (``rollout/``, ``reward/``) or per token (``loss/``, ``policy/`` fractions), over the step's global
batch; ``timing/`` is seconds.
"""

from __future__ import annotations

from collections.abc import Iterable

# ---- reward/: scores of the step's completions (every generated completion, all dynamic-sampling rounds) ----
REWARD_TOTAL = "reward/total"  # mean weighted sum of the reward components
REWARD_ACCURACY = "reward/math_accuracy"  # mean of the math_accuracy component: the training accuracy
REWARD_KL_PENALTY = "reward/kl_penalty"  # kl_coef x mean summed KL(pi_old || pi_ref) subtracted (kl_mode: reward)
REWARD_COUNTERS = ("errors", "timeouts", "abstained", "nonfinite")  # reward/<name>/<counter>: counts this step

# ---- rollout/: the completions and the sampler ----
ROLLOUT_LEN_MEAN = "rollout/len_mean"  # mean completion length in tokens (filler groups left out)
ROLLOUT_TRUNCATED_FRAC = "rollout/truncated_frac"  # share of completions cut at max_new_tokens
ROLLOUT_ZERO_ADV_GROUPS = "rollout/zero_adv_groups"  # share of groups whose advantages are all zero: no signal
ROLLOUT_VERSION_LAG = "rollout/version_lag"  # policy versions between the sampler's weights and the trained ones
ROLLOUT_SAMPLER_LOGP_ABSDIFF = "rollout/sampler_logp_absdiff"  # mean |log pi_old - log pi_sampler| per token
ROLLOUT_SAMPLER_LOGP_JUMP = "rollout/sampler_logp_jump"  # that difference over its running baseline
ROLLOUT_SYNC_ALARM = "rollout/sync_alarm"  # 1 when the sampler likely does not serve the trained weights
ROLLOUT_TIS_CAP_FRAC = "rollout/tis_cap_frac"  # share of tokens whose sampler-correction weight was capped
ROLLOUT_TIS_MASK_FRAC = "rollout/tis_mask_frac"  # share of tokens the sampler correction masked out
ROLLOUT_SYNC_MERGED = "rollout/sync_merged"  # vLLM backends: 1 when the sampler serves merged weights, 0 an adapter

# ---- loss/ and policy/: the update (means over the step's optimizer steps) ----
LOSS_POLICY = "loss/policy"  # the policy-gradient surrogate loss
LOSS_KL = "loss/kl"  # the KL term added to the loss (0 unless kl_mode: loss and kl_coef > 0)
LOSS_TOTAL = "loss/total"  # what was backpropagated for the policy (surrogate + KL - entropy bonus)
LOSS_CLIP_FRAC = "loss/clip_frac"  # share of tokens whose importance ratio was clipped
LOSS_VALUE = "loss/value"  # the critic's clipped value loss (ppo)
LOSS_VALUE_CLIP_FRAC = "loss/value_clip_frac"  # share of tokens whose value was clipped (ppo)
POLICY_KL = "policy/kl"  # KL of the policy to the reference (logged whenever a reference pass runs)
POLICY_ENTROPY = "policy/entropy"  # mean per-token entropy of the policy (on entropy_log_every steps)

# ---- optim/ and critic/ ----
OPTIM_GRAD_NORM = "optim/grad_norm"  # policy gradient norm before clipping
OPTIM_LR = "optim/lr"  # learning rate after the step
OPTIM_SKIPPED_STEPS = "optim/skipped_steps"  # optimizer steps skipped for a non-finite loss or gradient
CRITIC_VALUE_MEAN = "critic/value_mean"  # mean critic value per token before the update (ppo)
CRITIC_RETURN_MEAN = "critic/return_mean"  # mean GAE return per token (ppo)
CRITIC_GRAD_NORM = "critic/grad_norm"  # critic gradient norm before clipping (ppo)

# ---- sampling/: the group filters (docs/METHODS.md §3) ----
SAMPLING_ROUNDS = "sampling/rounds"  # generation rounds dynamic sampling needed to fill the batch
SAMPLING_DROPPED_GROUPS = "sampling/dropped_groups"  # groups dropped for a tied signal (all pass / all fail)
SAMPLING_KEPT_GROUPS = "sampling/kept_groups"  # informative groups in the batch
SAMPLING_BATCH_FILL = "sampling/batch_fill"  # kept groups / wanted groups
SAMPLING_FILLER_GROUPS = "sampling/filler_groups"  # weightless groups that pad a short batch (several processes)
SAMPLING_SKIPPED_PROMPTS = "sampling/skipped_prompts"  # prompts the difficulty filter passed over
SAMPLING_OVERLONG_MASKED = "sampling/overlong_masked"  # share of completions out of the loss (overlong filter)

# ---- timing/: seconds of a step's stages (rl_small.tracking.timer) ----
TIME_STEP = "timing/step"  # the whole step
TIME_PROMPTS = "timing/prompts"  # drawing prompts (all rounds)
TIME_ROLLOUT = "timing/rollout"  # generation (waiting for a prefetched draw included)
TIME_REWARD = "timing/reward"  # scoring
TIME_PREPARE = "timing/prepare"  # padding the batch and the no-grad passes (pi_old, pi_ref, critic values)
TIME_ADVANTAGE = "timing/advantage"  # advantages (and returns)
TIME_UPDATE = "timing/update"  # the optimizer steps
TIME_SYNC = "timing/sync"  # pushing the policy to the sampler
TIME_EVAL = "timing/eval"  # periodic benchmark evaluation
STAGES = (TIME_STEP, TIME_PROMPTS, TIME_ROLLOUT, TIME_REWARD, TIME_PREPARE, TIME_ADVANTAGE, TIME_UPDATE, TIME_SYNC,
          TIME_EVAL)

# ---- memory/: the episodic-memory reward's state (rewards/memory.py) ----
MEMORY = ("memory/success_keys", "memory/failure_keys", "memory/success_values", "memory/failure_values",
          "memory/exploit_mean", "memory/explore_mean", "memory/anneal", "memory/exploit_distance",
          "memory/exploit_centroid_sim", "memory/explore_novelty", "memory/explore_max_sim")

# ---- names older runs logged, read by rl-small report for their curves ----
OLD_TRUNCATED_FRAC = "rollout/clip_frac"  # rollout/truncated_frac before it was renamed
OLD_ENTROPY = "loss/entropy"  # policy/entropy in early runs

NAMES = frozenset({v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str)
                   and not k.startswith("OLD_")} | set(MEMORY))  # every fixed name a run logs today


def reward(name: str) -> str:
    """Mean score of reward component ``name`` (abstentions left out)."""
    return f"reward/{name}"


def reward_time(name: str) -> str:
    """Seconds reward component ``name`` took this step."""
    return f"timing/reward/{name}"


def sync_timing(kind: str, mode: str) -> str:
    """rollout.sync auto: ``kind`` sync_s (seconds of a push), tok_s (generation tokens/s) or step_s (their
    rollout + sync seconds per step) measured for ``mode`` (adapter or merged)."""
    return f"rollout/{kind}_{mode}"


def domain_weight(domain: str) -> str:
    """Sampling weight of a data.mix domain (domain_sampling)."""
    return f"sampling/domain_weight/{domain}"


def domain_reward(domain: str) -> str:
    """Running mean reward of a data.mix domain (domain_sampling)."""
    return f"sampling/domain_reward/{domain}"


def eval_pass1(bench: str) -> str:
    """Greedy pass@1 of periodic evaluation on benchmark ``bench``."""
    return f"eval/{bench}/pass@1"


def eval_len(bench: str) -> str:
    """Mean completion length of periodic evaluation on benchmark ``bench``."""
    return f"eval/{bench}/len_mean"


def is_metric(key: str, rewards: Iterable[str] = (), domains: Iterable[str] = (), benches: Iterable[str] = ()) -> bool:
    """Whether ``key`` is a name of this module, given the run's reward components, domains and benchmarks
    (a reward's own metrics, ``reward/<name>/<key>``, are the reward's to name)."""
    if key in NAMES:
        return True
    rewards = list(rewards)
    made = {reward_time(r) for r in rewards} | {domain_weight(d) for d in domains} | {domain_reward(d) for d in domains}
    made |= {eval_pass1(b) for b in benches} | {eval_len(b) for b in benches}
    made |= {sync_timing(k, mode) for k in ("sync_s", "tok_s", "step_s") for mode in ("adapter", "merged")}
    return key in made or any(key == reward(r) or key.startswith(reward(r) + "/") for r in rewards)
