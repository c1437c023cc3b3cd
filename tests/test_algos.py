"""Advantage estimators and policy losses against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from rl_small.advantages import ADVANTAGES
from rl_small.losses import aggregate, clipped_policy_loss, kl_k3

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
