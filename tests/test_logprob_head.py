"""The chunked log-prob head (rl_small.head) equals the naive full log-softmax in value and gradient, and
keeps no (N, V) tensor for backward."""

from __future__ import annotations

import pytest
import torch

from rl_small.head import lm_head_logprobs, logits_logprobs


def _naive(logits: torch.Tensor, t: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The head before rl_small.head: one full fp32 log-softmax."""
    lp_all = torch.log_softmax(logits.float() / temp, dim=-1)
    return lp_all.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(lp_all.exp() * lp_all).sum(-1)


def _case(dtype: torch.dtype, n: int = 37, h: int = 24, v: int = 101) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, h, generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    c1, c2 = torch.randn(n, generator=g), torch.randn(n, generator=g)  # upstream gradients of logp and entropy
    return hidden, w, b, t, c1, c2


TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temp", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_lm_head_matches_naive_values_and_gradients(dtype: torch.dtype, temp: float, bias: bool) -> None:
    hidden, w, b, t, c1, c2 = _case(dtype)
    bb = b if bias else None
    # rows=8: five chunks, the last one partial
    lp, ent = lm_head_logprobs(hidden, w, bb, t, temp, entropy=True, entropy_grad=True, rows=8)
    assert lp.dtype == torch.float32 and ent is not None
    (g,) = torch.autograd.grad((lp * c1).sum() + (ent * c2).sum(), hidden)
    ref_lp, ref_ent = _naive(torch.nn.functional.linear(hidden, w, bb), t, temp)
    (ref_g,) = torch.autograd.grad((ref_lp * c1).sum() + (ref_ent * c2).sum(), hidden)
    torch.testing.assert_close(lp, ref_lp, **TOL[dtype])
    torch.testing.assert_close(ent, ref_ent, **TOL[dtype])
    assert g.dtype == dtype and float(g.float().abs().max()) > 0.1
    torch.testing.assert_close(g.float(), ref_g.float(), **TOL[dtype])


def test_lm_head_entropy_only_when_asked_and_detached_without_entropy_grad() -> None:
    hidden, w, _b, t, c1, _ = _case(torch.float32)
    lp, ent = lm_head_logprobs(hidden, w, None, t, 1.0, rows=8)
    assert ent is None
    lp2, ent2 = lm_head_logprobs(hidden, w, None, t, 1.0, entropy=True, entropy_grad=False, rows=8)
    assert ent2 is not None and not ent2.requires_grad and lp2.requires_grad
    (g,) = torch.autograd.grad((lp * c1).sum(), hidden)
    (g2,) = torch.autograd.grad((lp2 * c1).sum(), hidden)
    torch.testing.assert_close(g, g2)
    with torch.no_grad():
        lp3, _ = lm_head_logprobs(hidden, w, None, t, 1.0)
    torch.testing.assert_close(lp3, lp.detach())
    w.requires_grad_()
    with pytest.raises(ValueError, match="frozen LM head"):
        lm_head_logprobs(hidden, w, None, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_logits_head_matches_naive_values_and_gradients(dtype: torch.dtype, temp: float) -> None:
    hidden, w, _, t, c1, c2 = _case(dtype, n=30)
    logits = torch.nn.functional.linear(hidden, w).detach().reshape(5, 6, -1).requires_grad_()
    before = logits.detach().clone()
    lp, ent = logits_logprobs(logits, t.reshape(5, 6), temp, entropy=True, entropy_grad=True, rows=7)
    assert lp.shape == (5, 6) and ent is not None and ent.shape == (5, 6)
    (g,) = torch.autograd.grad((lp * c1.reshape(5, 6)).sum() + (ent * c2.reshape(5, 6)).sum(), logits)
    assert torch.equal(logits.detach(), before), "the backward pass modified the logits"
    ref_lp, ref_ent = _naive(logits, t.reshape(5, 6), temp)
    (ref_g,) = torch.autograd.grad((ref_lp * c1.reshape(5, 6)).sum() + (ref_ent * c2.reshape(5, 6)).sum(), logits)
    torch.testing.assert_close(lp, ref_lp, **TOL[dtype])
    torch.testing.assert_close(ent, ref_ent, **TOL[dtype])
    assert g.dtype == dtype
    torch.testing.assert_close(g.float(), ref_g.float(), **TOL[dtype])


def test_lm_head_saves_no_vocabulary_sized_tensor_for_backward() -> None:
    """What autograd keeps between forward and backward is O(N H), not O(N V) (the naive head keeps its
    fp32 log-softmax, N V values)."""
    n, h, v = 64, 16, 4096
    hidden, w, _, t, _, _ = _case(torch.float32, n=n, h=h, v=v)
    saved: list[int] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        lm_head_logprobs(hidden, w, None, t, 0.7, entropy=True, entropy_grad=True, rows=16)
    assert saved and max(saved) <= n * h, saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        _naive(torch.nn.functional.linear(hidden, w), t, 0.7)
    assert max(saved) >= n * v  # the check can see a vocabulary-sized tensor


def test_lm_head_takes_hidden_states_of_another_dtype() -> None:
    """fp32 hidden states (e.g. out of an autocast region) on a bf16 head: projected in bf16, as the model's
    own head would under autocast; the gradient comes back in the hidden states' dtype."""
    hidden, w, _, t, c1, _ = _case(torch.float32)
    lp, _ = lm_head_logprobs(hidden, w.bfloat16(), None, t, rows=8)
    (g,) = torch.autograd.grad((lp * c1).sum(), hidden)
    ref, _ = _naive(torch.nn.functional.linear(hidden.bfloat16(), w.bfloat16()), t, 1.0)
    (ref_g,) = torch.autograd.grad((ref * c1).sum(), hidden)
    assert g.dtype == torch.float32
    torch.testing.assert_close(lp, ref, **TOL[torch.bfloat16])
    torch.testing.assert_close(g, ref_g, **TOL[torch.bfloat16])
