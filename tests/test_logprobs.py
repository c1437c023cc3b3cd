"""The shared-prefix logprob computation equals one full forward per sequence, in value and gradient."""

from __future__ import annotations

from pathlib import Path

import torch

from rl_small.config import load_recipe
from rl_small.logprobs import completion_logprobs, completion_logprobs_naive
from rl_small.models import load_policy
from rl_small.types import Prompt, Rollout


def _rollouts() -> list[Rollout]:
    p1, p2 = Prompt("a", "", "1"), Prompt("b", "", "2")
    return [
        Rollout(p1, 0, [5, 6, 7, 8], [9, 10, 11], "", None, False, 0),
        Rollout(p1, 0, [5, 6, 7, 8], [12], "", None, False, 0),
        Rollout(p2, 1, [13, 14], [15, 16, 17, 18, 19], "", None, True, 0),
        Rollout(p2, 1, [13, 14], [20, 21], "", None, False, 0),
    ]


def test_shared_prefix_matches_full_forward(tiny_model_dir: Path) -> None:
    cfg = load_recipe(
        None, [f"model.name={tiny_model_dir}", "model.lora.r=4", "model.lora.targets=[q_proj, v_proj]"]
    )
    model, tok = load_policy(cfg.model)
    with torch.no_grad():  # non-zero LoRA B so the adapter takes part in the comparison
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    rs = _rollouts()
    lp, mask = completion_logprobs(model, rs, tok.pad_token_id, temperature=0.7)
    ref, ref_mask = completion_logprobs_naive(model, rs, tok.pad_token_id, temperature=0.7)
    assert torch.equal(mask, ref_mask) and mask.sum() == 11
    torch.testing.assert_close(lp * mask, ref * ref_mask, atol=1e-5, rtol=1e-5)
    lora = [p for n, p in model.named_parameters() if "lora_A" in n]
    g1 = torch.autograd.grad((lp * mask).sum(), lora)
    g2 = torch.autograd.grad((ref * ref_mask).sum(), lora)
    assert sum(g.abs().sum() for g in g1) > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_entropy_and_value_states_come_from_the_same_shared_prefix_pass(tiny_model_dir: Path) -> None:
    """Entropy from the shared-prefix pass equals the full-forward entropy (value and gradient); the bare
    decoder's hidden states at the same positions (what the PPO value head reads) equal a full forward's."""
    from rl_small.logprobs import completion_logprobs_and_entropy, shared_prefix_forward
    from rl_small.losses import token_logprobs_and_entropy

    cfg = load_recipe(
        None, [f"model.name={tiny_model_dir}", "model.lora.r=4", "model.lora.targets=[q_proj, v_proj]"]
    )
    model, tok = load_policy(cfg.model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    rs = _rollouts()
    lp, mask, ent = completion_logprobs_and_entropy(model, rs, tok.pad_token_id, temperature=0.7)
    ref_lp, _ = completion_logprobs(model, rs, tok.pad_token_id, temperature=0.7)
    torch.testing.assert_close(lp, ref_lp)
    naive_ent = torch.zeros_like(ent)
    decoder = model.get_base_model().base_model
    hidden, _, _ = shared_prefix_forward(decoder, rs, tok.pad_token_id, hidden=True)
    for i, r in enumerate(rs):
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        sl = slice(len(r.prompt_ids) - 1, ids.shape[1] - 1)
        _, e = token_logprobs_and_entropy(model(input_ids=ids).logits[:, sl], ids[:, sl], temperature=0.7)
        naive_ent[i, : len(r.completion_ids)] = e[0]
        h = decoder(input_ids=ids).last_hidden_state[0, sl]
        torch.testing.assert_close(hidden[i, : len(r.completion_ids)], h, atol=1e-5, rtol=1e-5)
    assert float(ent.detach()[mask.bool()].min()) > 0
    torch.testing.assert_close(ent * mask, naive_ent * mask, atol=1e-5, rtol=1e-5)
    lora = [p for n, p in model.named_parameters() if "lora_A" in n]
    g1 = torch.autograd.grad((ent * mask).sum(), lora)
    g2 = torch.autograd.grad((naive_ent * mask).sum(), lora)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_shared_prefix_under_gradient_checkpointing_matches_plain(tiny_model_dir: Path) -> None:
    """Checkpointed layers keep the shared prompt cache (transformers drops it by default): the logprobs, the
    value-head states and their LoRA gradients equal the plain forward's."""
    from rl_small.logprobs import shared_prefix_forward
    from rl_small.models import enable_checkpointing

    cfg = load_recipe(
        None, [f"model.name={tiny_model_dir}", "model.lora.r=4", "model.lora.targets=[q_proj, v_proj]"]
    )
    model, tok = load_policy(cfg.model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.train()
    rs = _rollouts()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    decoder = model.get_base_model().base_model
    results = []
    for ckpt in (False, True):
        if ckpt:
            enable_checkpointing(model)
            assert decoder.layers[0].gradient_checkpointing
        lp, mask = completion_logprobs(model, rs, tok.pad_token_id, temperature=0.7)
        h, _, _ = shared_prefix_forward(decoder, rs, tok.pad_token_id, hidden=True)
        loss = (lp * mask).sum() + (h.pow(2).sum(-1) * mask).sum() * 1e-2
        results.append((lp.detach(), h.detach(), torch.autograd.grad(loss, lora)))
    (lp0, h0, g0), (lp1, h1, g1) = results
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-5)
    assert sum(g.abs().sum() for g in g0) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_ddp_wrapped_policy_gets_the_models_cache_keyword_and_same_logprobs(tiny_model_dir: Path) -> None:
    """Under N processes the policy is DistributedDataParallel(PeftModel(...)): the cache keyword must be read
    off the transformers model (DDP's forward(*inputs, **kwargs) names none), and values must not change."""
    import inspect
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from rl_small.logprobs import _cache_kwarg

    cfg = load_recipe(None, [f"model.name={tiny_model_dir}", "model.lora.r=4", "model.lora.targets=[q_proj, v_proj]"])
    model, tok = load_policy(cfg.model)
    inner = model.get_base_model()
    want = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        assert _cache_kwarg(ddp) == want == _cache_kwarg(model)
        rs = _rollouts()
        with torch.no_grad():
            lp, mask = completion_logprobs(model, rs, tok.pad_token_id)
            lp_ddp, _ = completion_logprobs(ddp, rs, tok.pad_token_id)
        torch.testing.assert_close(lp_ddp * mask, lp * mask)
    finally:
        if started:
            dist.destroy_process_group()


def test_shared_prefix_forward_puts_the_batch_on_the_models_device() -> None:
    """The batch is built on the CPU; on a GPU the model is not (the first H200 run of the recipes crashed at
    the first update: "index is on cpu, different from other tensors on cuda:0"). A stand-in model whose
    weights sit on the ``meta`` device records where its inputs arrive: all on the weights' device."""
    from types import SimpleNamespace

    from rl_small.logprobs import shared_prefix_forward

    class Elsewhere(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, device="meta"))
            self.seen: set[str] = set()

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    use_cache: bool, past_key_values: object, logits_to_keep: int = 0) -> SimpleNamespace:
            self.seen |= {t.device.type for t in (input_ids, attention_mask, position_ids)}
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 3, device=input_ids.device))

    model = Elsewhere()
    out, c_ids, c_mask = shared_prefix_forward(model, _rollouts(), pad_id=0)
    assert model.seen == {"meta"}
    assert out.device.type == c_ids.device.type == c_mask.device.type == "meta" and tuple(out.shape) == (4, 5, 3)
