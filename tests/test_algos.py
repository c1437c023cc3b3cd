"""Advantage estimators and policy losses against hand-computed values; micro-batch gradient equivalence."""

from __future__ import annotations

import pytest
import torch

from rl_small.advantages import ADVANTAGES, last_token_rewards, masked_whiten
from rl_small.losses import (
    KL_ESTIMATORS,
    aggregate,
    clipped_policy_loss,
    kl_k3,
    token_logprobs_and_entropy,
    value_loss,
)

R = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0])
G = torch.tensor([0, 0, 0, 0, 1, 1, 1])


def test_grpo_group_normalised_and_ties_give_zero() -> None:
    adv = ADVANTAGES["grpo"](R, G, eps=0.0)
    # group 0: mean 0.5, unbiased std sqrt(1/3) -> +-0.5/0.57735 = +-0.866025
    torch.testing.assert_close(adv[:4], torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-5, rtol=0)
    assert torch.equal(adv[4:], torch.zeros(3))  # identical rewards: no signal


def test_dr_grpo_and_rloo() -> None:
    torch.testing.assert_close(ADVANTAGES["dr_grpo"](R, G), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0]))
    # rloo: r_i - mean of the other three in group 0: 1 - 1/3, 0 - 2/3
    torch.testing.assert_close(
        ADVANTAGES["rloo"](R, G), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0]), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(
    ("ratio", "adv", "loss", "clipped"),
    [
        (1.0, 1.0, -1.0, 0.0),  # at 1: the plain surrogate
        (1.1, 1.0, -1.1, 0.0),  # inside the bound
        (1.5, 1.0, -1.28, 1.0),  # above 1 + eps_high (clip-higher 0.28): clipped
        (0.5, 1.0, -0.5, 0.0),  # below 1 - eps_low with A > 0: min keeps the unclipped (pessimistic) value
        (0.5, -1.0, 0.8, 1.0),  # below 1 - eps_low with A < 0: clipped at 0.8
        (1.5, -1.0, 1.5, 0.0),  # above with A < 0: unclipped (pessimistic)
    ],
)
def test_clipped_surrogate_at_inside_outside_bounds(ratio: float, adv: float, loss: float, clipped: float) -> None:
    logp = torch.log(torch.tensor([[ratio]]))
    out, clip = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), 0.2, 0.28)
    assert out.item() == pytest.approx(loss, abs=1e-6)
    assert clip.item() == clipped


def test_aggregations_and_masking() -> None:
    loss = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx(2.0)  # (1+2+3)/3
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == pytest.approx(2.25)  # (1.5 + 3)/2
    assert aggregate(loss, mask, "seq_mean_token_sum_norm", norm_len=10).item() == pytest.approx(0.3)  # 6/(2*10)


def test_dr_grpo_normaliser_does_not_depend_on_response_length() -> None:
    short = aggregate(torch.ones(2, 4), torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0]]), "seq_mean_token_sum_norm", 8)
    long = aggregate(torch.ones(2, 4), torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1]]), "seq_mean_token_sum_norm", 8)
    assert short.item() == pytest.approx(2 / 16) and long.item() == pytest.approx(8 / 16)  # sum / (B * 8)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_add_up_to_the_full_batch(mode: str) -> None:
    torch.manual_seed(0)
    loss = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    full = aggregate(loss, mask, mode, norm_len=5)
    n_tok = float(mask.sum())
    parts = sum(aggregate(loss[i : i + 2], mask[i : i + 2], mode, 5, num_seqs=6, num_tokens=n_tok) for i in (0, 2, 4))
    torch.testing.assert_close(parts, full, atol=1e-6, rtol=0)


def test_k3_kl_is_zero_at_equality_and_positive_otherwise() -> None:
    lp = torch.log(torch.tensor([[0.5, 0.2]]))
    assert torch.equal(kl_k3(lp, lp), torch.zeros(1, 2))
    ref = torch.log(torch.tensor([[0.25, 0.4]]))
    # r = ref/pi: 0.5 -> 0.5 - 1 - ln 0.5 = 0.193147; 2 -> 2 - 1 - ln 2 = 0.306853
    torch.testing.assert_close(kl_k3(lp, ref), torch.tensor([[0.193147, 0.306853]]), atol=1e-5, rtol=0)


# ---- dual clip ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ratio", "adv", "loss", "active"),
    [
        (5.0, -1.0, 3.0, 1.0),  # A < 0, rho A = -5: the plain surrogate would give 5, the dual bound caps it at 3
        (3.0, -1.0, 3.0, 0.0),  # exactly at the bound c = 3: both give 3, the bound is not what acts
        (2.0, -1.0, 2.0, 0.0),  # inside the bound: unchanged (min keeps the unclipped -2)
        (0.5, -1.0, 0.8, 1.0),  # below 1 - eps_low with A < 0: the ordinary clip, dual clip irrelevant
        (5.0, 1.0, -1.28, 1.0),  # A > 0: dual clip never applies, the upper clip does
    ],
)
def test_dual_clip_bound(ratio: float, adv: float, loss: float, active: float) -> None:
    logp = torch.log(torch.tensor([[ratio]])).requires_grad_()
    out, ind = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), 0.2, 0.28, dual_clip=3.0)
    assert out.item() == pytest.approx(loss, abs=1e-6)
    assert ind.item() == active
    (grad,) = torch.autograd.grad(out.sum(), logp)
    if ratio == 5.0:  # a clipped or dual-clipped token passes no gradient
        assert grad.item() == 0.0


def test_dual_clip_off_by_default_and_must_exceed_one() -> None:
    logp = torch.log(torch.tensor([[5.0]]))
    out, _ = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), 0.2, 0.28)
    assert out.item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="dual_clip must be > 1, got 0.5"):
        clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), dual_clip=0.5)


# ---- KL estimators -----------------------------------------------------------------------------------------
def test_k1_k2_k3_by_hand() -> None:
    lp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.4]]))
    # r = ref / pi = [0.5, 2]; log r = [-ln 2, ln 2]
    torch.testing.assert_close(KL_ESTIMATORS["k1"](lp, ref), torch.tensor([[0.693147, -0.693147]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(KL_ESTIMATORS["k2"](lp, ref), torch.tensor([[0.240227, 0.240227]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(KL_ESTIMATORS["k3"](lp, ref), torch.tensor([[0.193147, 0.306853]]), atol=1e-5, rtol=0)
    for name, fn in KL_ESTIMATORS.items():
        assert torch.equal(fn(lp, lp), torch.zeros(1, 2)), name


# ---- value loss ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("v", "v_old", "ret", "loss", "clipped"),
    [
        (1.0, 0.5, 1.0, 0.045, 1.0),  # V moved +0.5 > 0.2: clipped V = 0.7, 0.5*(0.7-1)^2 = 0.045 beats 0
        (0.6, 0.5, 1.0, 0.08, 0.0),  # inside the clip range: 0.5*(0.6-1)^2 = 0.08 either way
        (0.0, 0.5, 1.0, 0.5, 0.0),  # moved away from R: the unclipped 0.5*1 = 0.5 is the larger one
        (1.2, 0.5, 0.0, 0.72, 0.0),  # 0.5*1.44 vs 0.5*0.49
    ],
)
def test_value_loss_clipping_by_hand(v: float, v_old: float, ret: float, loss: float, clipped: float) -> None:
    values = torch.tensor([[v]], requires_grad=True)
    out, ind = value_loss(values, torch.tensor([[v_old]]), torch.tensor([[ret]]), clip=0.2)
    assert out.item() == pytest.approx(loss, abs=1e-6)
    assert ind.item() == clipped
    (grad,) = torch.autograd.grad(out.sum(), values)
    assert grad.item() == pytest.approx(0.0 if clipped else v - ret)  # the clipped branch is constant in V


def test_value_loss_without_clip_is_half_squared_error() -> None:
    out, ind = value_loss(torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]), clip=None)
    torch.testing.assert_close(out, torch.tensor([[0.5, 2.0]]))
    assert not ind.any()


# ---- REINFORCE++ ---------------------------------------------------------------------------------------------
def test_reinforce_pp_normalises_over_the_global_batch() -> None:
    adv = ADVANTAGES["reinforce_pp"](R, G, eps=0.0)
    # mean 8/7, population std sqrt(2 - 64/49) = 0.832993 over all 7 sequences, not per group: the tied group
    # (2, 2, 2) is *not* zeroed (REINFORCE++ has no group baseline)
    expect = torch.tensor([-0.171499, -1.371989, -1.371989, -0.171499, 1.028992, 1.028992, 1.028992])
    torch.testing.assert_close(adv, expect, atol=1e-5, rtol=0)
    # REINFORCE++-baseline: group mean first (0.5, -0.5, ..., 0, 0, 0), then std sqrt(1/7) -> +-1.322876
    base = ADVANTAGES["reinforce_pp"](R, G, group_baseline=True, eps=0.0)
    expect = torch.tensor([1.322876, -1.322876, -1.322876, 1.322876, 0, 0, 0])
    torch.testing.assert_close(base, expect, atol=1e-5, rtol=0)


def test_reinforce_pp_per_token_kl_reward_to_go_by_hand() -> None:
    rewards, gids = torch.tensor([1.0, 0.0]), torch.tensor([0, 1])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])  # 9.0 sits on padding: must not count
    adv = ADVANTAGES["reinforce_pp"](rewards, gids, mask=mask, kl=kl, kl_coef=1.0, eps=0.0)
    # returns r - sum_{s>=t} KL_s: row 0 [1-0.6, 1-0.5, 1-0.3] = [0.4, 0.5, 0.7]; row 1 [-0.9, -0.5]
    # token mean 0.04, population variance 0.3904, std 0.624820
    expect = torch.tensor([[0.576166, 0.736212, 1.056304], [-1.504433, -0.864249, 0.0]])
    torch.testing.assert_close(adv, expect, atol=1e-5, rtol=0)


# ---- GAE -------------------------------------------------------------------------------------------------------
VALUES = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 99.0]])  # 99 sits on padding
MASK = torch.tensor([[1.0, 1, 1], [1, 1, 0]])


def test_gae_two_padded_sequences_by_hand() -> None:
    adv, ret = ADVANTAGES["gae"](VALUES, torch.tensor([1.0, 0.0]), MASK, gamma=1.0, lam=0.5)
    # row 0: delta = [0.6-0.5, 0.7-0.6, 1-0.7] = [0.1, 0.1, 0.3]; A2 = 0.3, A1 = 0.1 + 0.5*0.3 = 0.25,
    #        A0 = 0.1 + 0.5*0.25 = 0.225. Row 1 ends at t=1: delta1 = 0 + 0 - 0.4 (no bootstrap from the pad),
    #        delta0 = 0.4 - 0.2 = 0.2, A0 = 0.2 + 0.5*(-0.4) = 0.
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3], [0.0, -0.4, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0], [0.2, 0.0, 0.0]]), atol=1e-6, rtol=0)
    # gamma = 0.5, lambda = 1: A_t = gamma^(L-1-t) r - V_t (Monte Carlo): row 0 [0.25-0.5, 0.5-0.6, 1-0.7]
    adv, _ = ADVANTAGES["gae"](VALUES, torch.tensor([1.0, 0.0]), MASK, gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[-0.25, -0.1, 0.3], [-0.2, -0.4, 0.0]]), atol=1e-6, rtol=0)


def test_gae_padding_contributes_nothing_and_token_rewards_match() -> None:
    garbage = VALUES.clone()
    garbage[1, 2] = float("nan")
    a1, r1 = ADVANTAGES["gae"](VALUES, torch.tensor([1.0, 0.0]), MASK)
    a2, r2 = ADVANTAGES["gae"](garbage, torch.tensor([1.0, 0.0]), MASK)
    assert torch.equal(a1, a2) and torch.equal(r1, r2)
    tok = last_token_rewards(torch.tensor([1.0, 0.0]), MASK)
    assert torch.equal(tok, torch.tensor([[0.0, 0, 1], [0, 0, 0]]))
    a3, _ = ADVANTAGES["gae"](VALUES, tok, MASK)
    torch.testing.assert_close(a1, a3)


def test_masked_whiten() -> None:
    x = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # mean 3, population std sqrt(8/3) = 1.632993 over the three masked entries
    torch.testing.assert_close(masked_whiten(x, m, eps=0.0), torch.tensor([[-1.224745, 0.0], [1.224745, 0.0]]))


# ---- entropy -------------------------------------------------------------------------------------------------
def test_entropy_by_hand() -> None:
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, float(torch.log(torch.tensor(3.0))), -1e9, -1e9]]])
    lp, ent = token_logprobs_and_entropy(logits, torch.tensor([[0, 1]]))
    # uniform over 4: ln 4; p = (1/4, 3/4): -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335
    torch.testing.assert_close(ent, torch.tensor([[1.386294, 0.562335]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(lp, torch.log(torch.tensor([[0.25, 0.75]])), atol=1e-6, rtol=0)
    # temperature 2 on doubled logits gives the same distribution
    _, ent2 = token_logprobs_and_entropy(logits * 2, torch.tensor([[0, 1]]), temperature=2.0)
    torch.testing.assert_close(ent2, ent)


# ---- gradient accumulation with every loss term ------------------------------------------------------------
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_match_full_batch_gradient_with_all_terms(mode: str) -> None:
    """Clipped (+ dual-clipped) surrogate + beta k3 KL - c entropy + value loss, with overlong-filtered rows:
    three micro-batches with the global counts accumulate to the full-batch gradient within 1e-5."""
    torch.manual_seed(0)
    b, t, v = 6, 5, 7
    logits = torch.randn(b, t, v, requires_grad=True)
    values = torch.randn(b, t, requires_grad=True)
    targets = torch.randint(0, v, (b, t))
    old = torch.log_softmax(torch.randn(b, t, v), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref = torch.log_softmax(torch.randn(b, t, v), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    adv, old_v, ret = torch.randn(b, t), torch.randn(b, t), torch.randn(b, t)
    mask = (torch.rand(b, t) > 0.3).float()
    mask[:, 0] = 1
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])  # rows 1 and 4 truncated: out of the policy loss
    pmask = mask * keep.unsqueeze(-1)
    n_seq, n_tok, n_tok_v = float(keep.sum()), float(pmask.sum()), float(mask.sum())

    def loss_of(rows: slice) -> torch.Tensor:
        lp, ent = token_logprobs_and_entropy(logits[rows], targets[rows])
        pm = pmask[rows]
        pg, _ = clipped_policy_loss(lp, old[rows], adv[rows], 0.2, 0.28, dual_clip=3.0)
        total = aggregate(pg, pm, mode, t, n_seq, n_tok)
        total = total + 0.1 * aggregate(kl_k3(lp, ref[rows]), pm, mode, t, n_seq, n_tok)
        total = total - 0.01 * aggregate(ent, pm, mode, t, n_seq, n_tok)
        vl, _ = value_loss(values[rows], old_v[rows], ret[rows], 0.2)
        return total + aggregate(vl, mask[rows], "token_mean", num_tokens=n_tok_v)

    full = torch.autograd.grad(loss_of(slice(0, b)), [logits, values])
    parts = [torch.autograd.grad(loss_of(slice(i, i + 2)), [logits, values]) for i in (0, 2, 4)]
    for k in range(2):
        torch.testing.assert_close(sum(p[k] for p in parts), full[k], atol=1e-5, rtol=0)
    # padding and the truncated rows get no policy-side gradient at all; only the value loss reaches the latter
    assert full[0][pmask == 0].abs().sum() == 0 and full[0][pmask == 1].abs().sum() > 0
    assert full[1][mask == 0].abs().sum() == 0 and full[1][1].abs().sum() > 0


def test_tis_weights_truncate_the_ratio_of_trainer_to_sampler() -> None:
    from rl_small.losses import tis_weights

    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    sampler = torch.log(torch.tensor([[0.25, 0.4, 0.1]]))
    w, capped = tis_weights(old, sampler, cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5, 2.0]]))  # ratios 2, 0.5, 9 -> 9 capped at 2
    assert capped.tolist() == [[0.0, 0.0, 1.0]]
    old.requires_grad_(True)
    assert not tis_weights(old, sampler, 2.0)[0].requires_grad  # a weight, not a path for gradients


def test_whitening_split_over_processes_equals_the_whole_batch() -> None:
    """ppo's whitening and reinforce_pp's normalisation are batch-wide: with ``sum_fn`` summing over the
    processes, each process's rows come out as they would in one process holding every row."""
    from tests.helpers import ThreadWorld

    torch.manual_seed(0)
    x, m = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    r, g = torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 1, 1, 1])
    whole = masked_whiten(x, m)
    rpp = ADVANTAGES["reinforce_pp"](r, g, mask=m)
    parts = ThreadWorld.run(ThreadWorld.group(2), lambda w: (
        masked_whiten(x[3 * w.rank : 3 * w.rank + 3], m[3 * w.rank : 3 * w.rank + 3], sum_fn=w.sum),
        ADVANTAGES["reinforce_pp"](r[3 * w.rank : 3 * w.rank + 3], g[3 * w.rank : 3 * w.rank + 3],
                                   mask=m[3 * w.rank : 3 * w.rank + 3], sum_fn=w.sum)))
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), rpp)
    alone = masked_whiten(x[:3], m[:3])  # without the sum the halves are normalised on their own: different
    assert (alone - whole[:3]).abs().max() > 0.05
