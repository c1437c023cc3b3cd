"""The policy-loss registry (rl_small.policy_losses) and its entries (rl_small.losses): each entry's values
and gradients against a naive per-element reference written with the math module; the sampler correction's
four modes; the default path equal bit for bit to the code it replaced; plug-ins by import path; short
training runs of every entry on the tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rl_small.config import RecipeError, load_recipe
from rl_small.config_algo import GrpoConfig
from rl_small.losses import clipped_policy_loss, is_weights, policy_loss
from rl_small.policy_losses import BUILTIN_POLICY_LOSSES, POLICY_LOSSES, resolve_policy_loss

B, T = 4, 6


def _inputs(seed: int = 0, spread: float = 0.6) -> dict[str, torch.Tensor]:
    """logp (with grad), old, sampler logprobs, per-sequence advantages broadcast to (B, T), a ragged mask."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + spread * torch.randn(B, T, generator=g)).requires_grad_()
    sampler = old + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.tensor([1.3, -0.7, 2.1, -1.9]).unsqueeze(-1).expand(B, T).contiguous()
    lengths = [6, 3, 5, 1]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths])
    return {"logp": logp, "old": old, "sampler": sampler, "adv": adv, "mask": mask}


def _grad(loss: torch.Tensor, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """d sum(loss * mask) / d logp."""
    (g,) = torch.autograd.grad((loss * x["mask"]).sum(), x["logp"])
    return g


def _run(name: str, x: dict[str, torch.Tensor], sampler: bool = False, **opts: object):
    cfg = GrpoConfig(policy_loss=name, **opts)
    return policy_loss(x["logp"], x["old"], x["sampler"] if sampler else None, x["adv"], x["mask"], cfg)


def _cells(x: dict[str, torch.Tensor]):
    x = {k: v.detach() for k, v in x.items()}
    for i in range(B):
        for t in range(T):
            yield i, t, float(x["logp"][i, t]), float(x["old"][i, t]), float(x["adv"][i, t])


# ---- clipped -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("clip", "dual"), [((0.2, 0.2), None), ((0.2, 0.28), None), ((0.1, 0.3), 3.0)])
def test_clipped_values_and_gradients_match_a_naive_reference(clip: tuple[float, float], dual: float | None) -> None:
    x = _inputs(1, spread=1.2)  # ratios from ~0.1 to ~10: every branch is taken
    loss, metrics = _run("clipped", x, clip=clip, dual_clip=dual)
    grad = _grad(loss, x)
    branches = set()
    for i, t, lp, old, a in _cells(x):
        r = math.exp(lp - old)
        unclipped, clipped = r * a, min(max(r, 1 - clip[0]), 1 + clip[1]) * a
        ref, g, active = -min(unclipped, clipped), (-r * a if unclipped <= clipped else 0.0), clipped < unclipped
        if dual is not None and a < 0 and ref > -dual * a:
            ref, g, active = -dual * a, 0.0, True
        branches.add((active, a > 0))
        assert loss[i, t].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
        assert metrics["loss/clip_frac"][i, t].item() == float(active)
        assert grad[i, t].item() == pytest.approx(g * x["mask"][i, t].item(), rel=1e-5, abs=1e-6)
    assert len(branches) == 4  # clipped and not, for A > 0 and A < 0


def test_dual_clip_caps_the_negative_advantage_loss() -> None:
    x = _inputs(2, spread=2.0)
    plain, _ = _run("clipped", x)
    capped, metrics = _run("clipped", x, dual_clip=3.0)
    neg = x["adv"] < 0
    assert (capped[neg] <= 3.0 * x["adv"][neg].abs() + 1e-6).all()
    assert (plain[neg] > 3.0 * x["adv"][neg].abs()).any()  # without it the loss exceeds c |A| somewhere
    assert torch.equal(capped[~neg], plain[~neg])  # positive advantages: dual clip never applies
    hit = neg & (plain > 3.0 * x["adv"].abs())
    assert metrics["loss/clip_frac"][hit].eq(1).all()
    assert _grad(capped, x)[hit].eq(0).all()  # the bound is a constant: no gradient


# ---- gspo --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gspo_clip", [(3e-4, 4e-4), (0.05, 0.08)])
def test_gspo_values_and_gradients_match_a_naive_reference(gspo_clip: tuple[float, float]) -> None:
    x = _inputs(3, spread=0.1)
    loss, metrics = _run("gspo", x, gspo_clip=gspo_clip)
    grad = _grad(loss, x)
    for i in range(B):
        valid = [t for t in range(T) if x["mask"][i, t] > 0]
        a = float(x["adv"][i, 0])
        s = math.exp(sum(float(x["logp"][i, t].detach() - x["old"][i, t]) for t in valid) / len(valid))
        unclipped, clipped = s * a, min(max(s, 1 - gspo_clip[0]), 1 + gspo_clip[1]) * a
        ref = -min(unclipped, clipped)
        # d/dlogp_t of sum over the n valid tokens of L_i: n * dL/ds * s / n = -A s on the unclipped branch
        g = -a * s if unclipped <= clipped else 0.0
        for t in range(T):
            assert loss[i, t].item() == pytest.approx(ref, rel=1e-5)  # padding too: the mask drops it
            assert metrics["loss/clip_frac"][i, t].item() == float(clipped < unclipped)
            assert grad[i, t].item() == pytest.approx(g if t in valid else 0.0, rel=1e-5, abs=1e-7)


def test_gspo_ratio_is_per_sequence() -> None:
    """Every token of a sequence shares one (clipped) ratio: the loss / A and the clip indicator are constant
    along a sequence, and a change of one token's logprob moves every token's loss of that sequence."""
    x = _inputs(4, spread=0.3)
    loss, metrics = _run("gspo", x, gspo_clip=(0.05, 0.05))
    ratio = -loss / x["adv"]
    for i in range(B):
        n = int(x["mask"][i].sum())
        assert torch.allclose(ratio[i, :n], ratio[i, 0].expand(n), rtol=0, atol=0)
        assert metrics["loss/clip_frac"][i].unique().numel() == 1
    assert metrics["loss/clip_frac"].sum() > 0 and (metrics["loss/clip_frac"] == 0).any()
    clipped = metrics["loss/clip_frac"][:, 0] > 0
    assert (ratio[clipped, 0] - 1).abs().max() <= 0.05 + 1e-6
    bumped = {k: v.detach().clone() for k, v in x.items()}
    bumped["logp"][0, 0] += 1e-3
    bumped["logp"].requires_grad_()
    moved = (_run("gspo", bumped, gspo_clip=(0.5, 0.5))[0] != _run("gspo", x, gspo_clip=(0.5, 0.5))[0])
    assert moved[0, :6].all() and not moved[1:].any()


def test_gspo_with_token_mean_equals_the_papers_sequence_objective() -> None:
    """Aggregated with seq_mean_token_mean the per-token loss is the paper's (1/G) sum_i min(s_i A_i, ...)."""
    from rl_small.losses import aggregate

    x = _inputs(5, spread=0.2)
    loss, _ = _run("gspo", x, gspo_clip=(0.05, 0.05))
    per_seq = loss[:, 0]
    torch.testing.assert_close(aggregate(loss, x["mask"], "seq_mean_token_mean"), per_seq.mean())


# ---- cispo -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cap", [5.0, 1.2])
def test_cispo_values_and_gradients_match_a_naive_reference(cap: float) -> None:
    x = _inputs(6, spread=1.6)
    loss, metrics = _run("cispo", x, cispo_cap=cap)
    grad = _grad(loss, x)
    capped_any = False
    for i, t, lp, old, a in _cells(x):
        w = min(math.exp(lp - old), cap)
        capped_any |= math.exp(lp - old) > cap
        assert loss[i, t].item() == pytest.approx(-w * a * lp, rel=1e-5, abs=1e-6)
        assert metrics["loss/clip_frac"][i, t].item() == float(math.exp(lp - old) > cap)
        # the weight is a constant (stop-gradient): d/dlogp = -w A only. With a gradient through w it would
        # be -w A (1 + logp) on the uncapped tokens.
        assert grad[i, t].item() == pytest.approx(-w * a * x["mask"][i, t].item(), rel=1e-5, abs=1e-6)
    assert capped_any


# ---- sampler correction ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize(("low", "high"), [(None, 2.0), (0.5, 1.5)])
def test_is_weights_modes_match_a_naive_reference(mode: str, low: float | None, high: float) -> None:
    x = _inputs(7)
    w, bound = is_weights(x["old"], x["sampler"], x["mask"], mode, low, high)
    lo = -math.inf if low is None else low
    for i in range(B):
        seq = math.exp(sum(float(x["old"][i, t] - x["sampler"][i, t]) for t in range(T) if x["mask"][i, t] > 0))
        for t in range(T):
            r = seq if mode.startswith("sequence") else math.exp(float(x["old"][i, t] - x["sampler"][i, t]))
            out = r > high or r < lo
            ref = (min(max(r, lo), high)) if mode.endswith("truncate") else (0.0 if out else r)
            assert w[i, t].item() == pytest.approx(ref, rel=1e-5)
            assert bound[i, t].item() == float(out)
    assert not w.requires_grad


@pytest.mark.parametrize("name", BUILTIN_POLICY_LOSSES)
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_the_correction_weights_any_entry_and_passes_no_gradient(name: str, mode: str) -> None:
    x = _inputs(8)
    plain, _ = _run(name, x, tis_cap=None)
    corrected, metrics = _run(name, x, sampler=True, tis_mode=mode, tis_cap=1.5, tis_min=0.6)
    w, bound = is_weights(x["old"], x["sampler"], x["mask"], mode, 0.6, 1.5)
    assert torch.equal(corrected, plain * w)
    torch.testing.assert_close(_grad(corrected, x), _grad(plain, x) * w)
    key = "rollout/tis_mask_frac" if mode.endswith("mask") else "rollout/tis_cap_frac"
    assert torch.equal(metrics[key], bound) and bound.sum() > 0
    assert torch.equal(metrics["rollout/sampler_logp_absdiff"], (x["old"] - x["sampler"]).abs())
    assert set(_run(name, x, sampler=True, tis_cap=None)[1]) == {"loss/clip_frac", "rollout/sampler_logp_absdiff"}


# ---- the default path is the code it replaced ----------------------------------------------------------
def _old_trainer_code(logp, old, samp, adv, cfg):
    """rl_small/trainer.py before the registry, verbatim (clipped surrogate, then min(pi_old / pi_sampler, cap))."""
    pg, clipped = clipped_policy_loss(logp, old, adv, *cfg.clip, dual_clip=cfg.dual_clip)
    if samp is not None and cfg.tis_cap is not None:
        ratio = torch.exp((old - samp).detach())
        pg = pg * ratio.clamp(max=cfg.tis_cap)
    return pg, clipped


@pytest.mark.parametrize("sampler", [False, True])
@pytest.mark.parametrize("opts", [{}, {"clip": (0.2, 0.28), "dual_clip": 3.0}, {"tis_cap": 1.1}])
def test_default_path_is_bit_identical_to_the_replaced_code(sampler: bool, opts: dict) -> None:
    x = _inputs(9, spread=1.0)
    cfg = GrpoConfig(**opts)
    new, metrics = policy_loss(x["logp"], x["old"], x["sampler"] if sampler else None, x["adv"], x["mask"], cfg)
    old, clipped = _old_trainer_code(x["logp"], x["old"], x["sampler"] if sampler else None, x["adv"], cfg)
    assert torch.equal(new, old) and torch.equal(metrics["loss/clip_frac"], clipped)
    assert torch.equal(_grad(new, x), _grad(old, x))


# ---- registry, plug-ins, config ----------------------------------------------------------------------------
def test_builtins_are_registered_by_name() -> None:
    for name in BUILTIN_POLICY_LOSSES:
        assert resolve_policy_loss(name) is POLICY_LOSSES[name]
    assert set(BUILTIN_POLICY_LOSSES) <= set(POLICY_LOSSES)


def test_a_plugin_by_module_or_file_path_resolves_to_the_same_function() -> None:
    from tests import helpers

    assert resolve_policy_loss("tests.helpers:half_clipped_loss") is helpers.half_clipped_loss
    root = Path(__file__).resolve().parent
    assert resolve_policy_loss(f"{root / 'helpers.py'}:half_clipped_loss") is helpers.half_clipped_loss
    assert "tests.helpers:half_clipped_loss" not in POLICY_LOSSES  # a plug-in is not a registered name


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("clipped_ppo", r"unknown policy loss 'clipped_ppo': not registered \(cispo, clipped, gspo"),
        ("tests.helpers:nope", r"'tests.helpers:nope'.*has no attribute 'nope'.*registered: cispo, clipped, gspo"),
        ("no_such_module_xyz:fn", r"'no_such_module_xyz:fn' cannot be loaded.*No module named"),
        ("missing/file.py:fn", r"policy loss file 'missing/file.py'.*does not exist"),
        ("tests.helpers:loss_with_wrong_signature", r"must take \(logp, old_logp, sampler_logp, advantages, mask"),
    ],
)
def test_a_bad_policy_loss_is_a_recipe_error_at_load(value: str, expected: str) -> None:
    with pytest.raises(RecipeError, match=r"algo\.policy_loss: .*" + expected):
        load_recipe(None, [f"algo.policy_loss={value}"])


def test_new_options_are_checked_at_load() -> None:
    for override, expected in (
        ("algo.tis_mode=token_clip", "algo.tis_mode"),
        ("algo.tis_min=2.5", r"tis_min \(2.5\) must be below tis_cap \(2.0\)"),
        ("algo.gspo_clip=[0,1e-4]", "algo.gspo_clip"),
        ("algo.cispo_cap=0", "algo.cispo_cap"),
    ):
        with pytest.raises(RecipeError, match=expected):
            load_recipe(None, [override])
    cfg = load_recipe(None, ["algo.policy_loss=gspo", "algo.tis_mode=sequence_mask", "algo.tis_min=0.5"])
    assert (cfg.algo.policy_loss, cfg.algo.tis_mode, cfg.algo.tis_min, cfg.algo.gspo_clip) == (
        "gspo", "sequence_mask", 0.5, (3e-4, 4e-4))


# ---- training with the tiny model ----------------------------------------------------------------------
TOKEN_REWARD = "rewards=[{name: 'tests.helpers:token_reward'}]"
FAKE_MIXED = ["rollout.backend=fake", "rollout.fake_completions=['1', '22', '3 4', '5 6 7']"]


def _steps(overrides: list[str], run_dir: Path, n: int = 2, sampler_offset: float | None = None) -> list[dict]:
    from rl_small.logprobs import completion_logprobs
    from rl_small.trainer import Trainer

    tr = Trainer(load_recipe(None, overrides), run_dir)
    if sampler_offset is not None:  # a sampler whose logprobs differ from the trainer's, by token
        generate = tr.backend.generate

        def with_logprobs(prompts, spec):
            rs = generate(prompts, spec)
            with torch.no_grad():
                lp, _ = completion_logprobs(tr.model, rs, tr.tok.pad_token_id, tr.cfg.rollout.temperature)
            for i, r in enumerate(rs):
                k = len(r.completion_ids)
                r.sampler_logprobs = (lp[i, :k] - sampler_offset * torch.arange(k).remainder(3)).tolist()
            return rs

        tr.backend.generate = with_logprobs
    before = [p.detach().clone() for p in tr.policy_params]
    out = [tr.step() for _ in range(n)]
    assert any(not torch.equal(b, p) for b, p in zip(before, tr.policy_params))  # it learned
    return out


@pytest.mark.parametrize("options", [["algo.policy_loss=gspo"], ["algo.policy_loss=cispo"],
                                     ["algo.policy_loss=gspo", "algo.gspo_clip=[0.01, 0.01]", "algo.epochs=2"],
                                     ["algo.policy_loss=cispo", "algo.cispo_cap=1.05", "algo.epochs=2"]])
def test_each_entry_trains(tiny_overrides: list[str], tmp_path: Path, options: list[str]) -> None:
    for m in _steps(tiny_overrides + [TOKEN_REWARD, *FAKE_MIXED, *options], tmp_path):
        assert math.isfinite(m["loss/policy"]) and math.isfinite(m["loss/total"])
        assert 0 <= m["loss/clip_frac"] <= 1


@pytest.mark.parametrize("mode", ["token_mask", "sequence_truncate", "sequence_mask"])
def test_each_correction_mode_trains(tiny_overrides: list[str], tmp_path: Path, mode: str) -> None:
    opts = [f"algo.tis_mode={mode}", "algo.tis_cap=3.0", "algo.tis_min=0.5"]
    for m in _steps(tiny_overrides + [TOKEN_REWARD, *FAKE_MIXED, *opts], tmp_path, sampler_offset=0.2):
        assert math.isfinite(m["loss/policy"]) and m["rollout/sampler_logp_absdiff"] > 0
        key = "rollout/tis_mask_frac" if mode.endswith("mask") else "rollout/tis_cap_frac"
        assert 0 <= m[key] <= 1


def test_a_plugin_by_import_path_trains(tiny_overrides: list[str], tmp_path: Path) -> None:
    """tests.helpers:half_clipped_loss is half the clipped loss: the same step's policy loss halves, and the
    plug-in's own metric is logged."""
    base = tiny_overrides + [TOKEN_REWARD, *FAKE_MIXED]
    (ref,) = _steps(base, tmp_path / "ref", n=1)
    (plug,) = _steps(base + ["algo.policy_loss=tests.helpers:half_clipped_loss"], tmp_path / "plug", n=1)
    assert math.isfinite(plug["loss/policy"]) and abs(ref["loss/policy"]) > 1e-4
    assert plug["loss/policy"] == pytest.approx(0.5 * ref["loss/policy"], rel=1e-5)
    assert plug["loss/plugin_tokens"] == pytest.approx(1.0)


def test_readme_policy_loss_example(tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README's "Policy losses" plug-in, as printed, named by file path, trains a step."""
    import re

    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("### Policy losses", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "my_losses.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    (m,) = _steps(tiny_overrides + [TOKEN_REWARD, *FAKE_MIXED, "algo.policy_loss=my_losses.py:reinforce"],
                  tmp_path / "run", n=1)
    assert math.isfinite(m["loss/policy"]) and "loss/adv_mean" in m
