"""Every recipe under recipes/ resolves offline, and the scale-out matrix (5 models x 6 methods) is complete.

For each ``recipes/<model>/<method>/<variant>.yaml``: the closed config parses, the reward components build
(skipped with the reason when an optional package such as the MiniLM encoder is missing), the model name
resolves without the network (``resolve_model`` returns a hub id unchanged; built-in aliases are only looked
up, not converted), the method directory matches the algorithm, the header cites METHODS.md, and the token
budgets fit (length-penalty limits within ``max_new_tokens``, prompt + completion within vLLM's context).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from rl_small.config import RecipeError, RunConfig, load_recipe
from rl_small.models import BUILTIN_MODELS, resolve_model

ROOT = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(ROOT.rglob("*.yaml"))
MODELS = {
    "smollm2-135m": "smollm2-135m-instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "r1-distill-qwen-1.5b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
}
METHODS = ("grpo", "dr_grpo", "dapo", "ppo", "memory_r_plus", "tldr_length")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
PROMPT_ROOM = 256  # tokens of vLLM context kept for the prompt


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_matrix_is_complete() -> None:
    missing = [f"{m}/{meth}" for m in MODELS for meth in METHODS if not list((ROOT / m / meth).glob("*.yaml"))]
    assert not missing, f"recipes missing for {missing}"
    misplaced = [_rel(p) for p in RECIPES if len(p.relative_to(ROOT).parts) != 3]
    assert not misplaced, f"recipes must be recipes/<model>/<method>/<variant>.yaml: {misplaced}"
    unknown = sorted({p.relative_to(ROOT).parts[0] for p in RECIPES} - set(MODELS))
    assert not unknown, f"model folders without an expected model name here: {unknown}"


def _check_method(method: str, cfg: RunConfig) -> None:
    a, names = cfg.algo, [r.name for r in cfg.rewards]
    if method == "grpo":
        assert a.name == "grpo" and not cfg.sampling.dynamic_sampling
    elif method == "dr_grpo":
        assert a.name == "dr_grpo" and a.loss_agg == "seq_mean_token_sum_norm" and a.kl_coef == 0
    elif method == "dapo":
        assert a.name == "grpo" and a.clip[1] > a.clip[0] and a.loss_agg == "token_mean" and a.kl_coef == 0
        assert cfg.sampling.dynamic_sampling and (cfg.sampling.overlong_filter or "soft_overlong" in names)
    elif method == "ppo":
        assert a.name == "ppo" and cfg.model.lora is not None and a.minibatches <= cfg.rollout.prompts_per_step
    elif method == "memory_r_plus":
        assert "episodic_memory" in names
    elif method == "tldr_length":
        assert "tldr_length" in names
    else:
        raise AssertionError(f"unknown method folder {method!r}; expected one of {METHODS}")


def _check_budgets(cfg: RunConfig) -> None:
    r = cfg.rollout
    eval_tokens = cfg.train.eval_max_new_tokens or r.max_new_tokens
    assert r.max_model_len >= max(r.max_new_tokens, eval_tokens) + PROMPT_ROOM, (
        f"rollout.max_model_len {r.max_model_len} leaves no room for the prompt "
        f"(max_new_tokens {r.max_new_tokens}, eval {eval_tokens})"
    )
    for spec in cfg.rewards:
        p = spec.params
        if spec.name == "soft_overlong":
            assert p["max_tokens"] == r.max_new_tokens and 0 < p["buffer"] < p["max_tokens"], p
        if spec.name == "tldr_length":
            budgets = p.get("budgets", {})
            assert budgets and max(budgets.values()) <= r.max_new_tokens, (budgets, r.max_new_tokens)
            assert p.get("default_level", "medium") in budgets, p
        if spec.name == "cosine_length":
            assert p["max_tokens"] <= r.max_new_tokens, p


@pytest.mark.parametrize("path", RECIPES, ids=_rel)
def test_recipe_resolves(path: Path, no_network: None) -> None:
    from rl_small.builders import build_rewards

    model_dir, method, _ = path.relative_to(ROOT).parts
    cfg = load_recipe(path)
    assert cfg.name == path.stem
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "METHODS.md §" in header, f"{_rel(path)}: the header comment must cite its METHODS.md section"
    assert cfg.rollout.backend == "auto"

    name = cfg.model.name
    assert name == MODELS[model_dir], f"{_rel(path)}: model {name!r} in folder {model_dir!r}"
    if name in BUILTIN_MODELS:
        pass  # resolve_model would convert the embedded GGUF (slow); that path has its own tests
    else:
        assert HUB_ID.match(name), f"{name!r} is not a well-formed hub id"
        assert not Path(name).exists(), f"{name!r} is also a local path"
        assert resolve_model(name) == name  # returned as is: downloading is left to from_pretrained

    _check_method(method, cfg)
    _check_budgets(cfg)
    assert "math_accuracy" in [r.name for r in cfg.rewards]  # the grader of the held-out evaluation

    try:
        rewards = build_rewards(cfg)
    except RecipeError as err:
        if isinstance(err.__cause__, ModuleNotFoundError):  # an optional package (MiniLM encoder, faiss)
            pytest.skip(f"{_rel(path)}: {err.__cause__}")
        raise
    assert [c.name for c in rewards.components] == [r.name for r in cfg.rewards]
