"""TRL's and open-r1's reward functions, unchanged, give through rl-small the scores they give in their own
trainers: TRL's installed rewards against ``GRPOTrainer._calculate_rewards`` itself, open-r1's rewards.py
(vendored in tests/fixtures/open_r1, loaded by file path with its relative imports) against direct calls."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rl_small.builders import build_rewards
from rl_small.config import load_recipe

pytest.importorskip("math_verify")

OPEN_R1 = Path(__file__).parent / "fixtures" / "open_r1" / "src" / "open_r1" / "rewards.py"

# One conversational batch (TRL's format: the dataset's prompt is a list of messages), as the trainer has it.
QUESTIONS = ["What is 1/3 as a fraction?", "Half of 2/3?", "2+2?", "Name a variable.", "Repeat."]
TEXTS = [
    "<think>\nOne third.\n</think>\n<answer>\nThe answer is $\\boxed{\\frac{1}{3}}$\n</answer>",
    "<think>\nStep 1: halve it.\nStep 2: get 1/2.\n</think>\n\\boxed{\\frac{1}{2}}",
    "First, add. Next, check. Finally, \\boxed{4}",
    "<think>\nx x x x x x\n</think>\n<answer>\n\\boxed{x}\n</answer>",
    "<think>the the the the the the the the</think> \\boxed{5}",
]
SOLUTIONS = ["$\\frac{1}{3}$", "$\\frac{1}{3}$", "$4$", "no number here", "$5$"]
IDS = [[1, 2, 3, 4, 5], [7] * 12, list(range(95)), [1, 2] * 30, [3, 4, 5] * 40]


def _rows() -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "question": q, "answer": s, "solution": s,
             "prompt": [{"role": "user", "content": q}]} for i, (q, s) in enumerate(zip(QUESTIONS, SOLUTIONS))]


def _rl_small_scores(specs: str) -> dict[str, list[float | None]]:
    """Build the recipe's rewards (checked on a sample row) and score the batch as RolloutStream.score does."""
    rows = _rows()
    cfg = load_recipe(None, [f"rewards={specs}"])
    combo = build_rewards(cfg, {"generic": (None, rows[:1])})
    columns = {k: [r[k] for r in rows] for k in ("question", "answer", "solution", "prompt")}
    _, per, metrics = combo(TEXTS, prompts=[f"<|user|>{q}" for q in QUESTIONS], completion_ids=IDS,
                            group_id=[0] * 5, truncated=[False] * 5, step=3, **columns)
    assert not any(v for k, v in metrics.items() if k.endswith(("/errors", "/timeouts"))), metrics
    return per


def _specs(prefix: str, table: dict[str, dict[str, Any]]) -> str:
    """A recipe's rewards list: one entry per function, its parameters as recipe keys."""
    return "[" + ", ".join(f"{{name: '{prefix}:{n}'" + "".join(f", {k}: {v}" for k, v in p.items()) + "}"
                           for n, p in table.items()) + "]"


def _same(ours: list[float | None], theirs: list[float]) -> bool:
    return all((a is None and math.isnan(b)) or (a is not None and math.isclose(a, b, abs_tol=1e-6))
               for a, b in zip(ours, theirs, strict=True))


# ---- TRL ------------------------------------------------------------------------------------------------
TRL_SPECS = {  # every reward trl.rewards ships (1.16), with recipe parameters for the factories
    "accuracy_reward": {},
    "reasoning_accuracy_reward": {},
    "think_format_reward": {},
    "get_cosine_scaled_reward": {"max_len": 100},
    "get_repetition_penalty_reward": {"ngram_size": 2, "max_penalty": -1.0},
    "get_soft_overlong_punishment": {"max_completion_len": 100, "soft_punish_cache": 20},
}


def _trl_scores(funcs: list[Any]) -> Any:
    """Run TRL's own GRPOTrainer._calculate_rewards (unbound, on a stand-in trainer) over the batch."""
    import torch
    from transformers import TrainerState
    from trl.trainer.grpo_trainer import GRPOTrainer

    rows = _rows()
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True), args=SimpleNamespace(report_to=[]),
        reward_funcs=funcs, reward_processing_classes=[None] * len(funcs),
        reward_func_names=[f"f{i}" for i in range(len(funcs))], state=TrainerState(global_step=3),
        _log_completion_extra=lambda column, values: None, _log_metric=lambda name, value: None, environments=None,
    )
    prompts = [r["prompt"] for r in rows]
    completions = [[{"role": "assistant", "content": t}] for t in TEXTS]
    return GRPOTrainer._calculate_rewards(trainer, rows, prompts, completions, IDS)


def test_every_trl_reward_scores_as_in_grpo_trainer() -> None:
    trl_rewards = pytest.importorskip("trl.rewards")
    shipped = sorted(n for names in trl_rewards._import_structure.values() for n in names)
    assert shipped == sorted(TRL_SPECS), "trl.rewards changed: add the new rewards to this parity test"
    funcs = [getattr(trl_rewards, n)(**p) if p else getattr(trl_rewards, n) for n, p in TRL_SPECS.items()]
    theirs = _trl_scores(funcs)
    ours = _rl_small_scores(_specs("trl.rewards", TRL_SPECS))
    for j, name in enumerate(TRL_SPECS):
        col = theirs[:, j].tolist()
        assert _same(ours[f"trl.rewards:{name}"], col), (name, ours[f"trl.rewards:{name}"], col)
    # the batch is not degenerate: rewards disagree across completions, and one gold is unparseable (None)
    assert ours["trl.rewards:accuracy_reward"] == [1.0, 0.0, 1.0, None, 1.0]
    assert ours["trl.rewards:get_soft_overlong_punishment"] == [0.0, 0.0, -0.75, 0.0, -1.0]


# ---- open-r1 --------------------------------------------------------------------------------------------
OPEN_R1_SPECS = {
    "accuracy_reward": {},
    "format_reward": {},
    "tag_count_reward": {},
    "reasoning_steps_reward": {},
    "len_reward": {},
    "get_cosine_scaled_reward": {"max_len": 120},
    "get_repetition_penalty_reward": {"ngram_size": 2, "max_penalty": -1.0},
    "get_soft_overlong_punishment": {"max_completion_len": 100, "soft_punish_cache": 20},
    "get_code_format_reward": {"language": "python"},
}


def test_open_r1_rewards_load_by_file_path_and_score_as_open_r1_does() -> None:
    ours = _rl_small_scores(_specs(str(OPEN_R1), OPEN_R1_SPECS))

    import open_r1.rewards as r1  # loaded by rl-small's loader above, as part of its package

    assert Path(r1.__file__).resolve() == OPEN_R1.resolve()
    rows = _rows()
    kwargs = {"prompts": [r["prompt"] for r in rows], "completions": [[{"role": "assistant", "content": t}]
                                                                       for t in TEXTS],
              "completion_ids": IDS, "solution": SOLUTIONS}
    for name, params in OPEN_R1_SPECS.items():
        fn = getattr(r1, name)(**params) if params else getattr(r1, name)
        theirs = fn(**kwargs)  # open-r1's own call, with GRPOTrainer's keywords
        assert ours[f"{OPEN_R1}:{name}"] == theirs, name
    assert ours[f"{OPEN_R1}:accuracy_reward"] == [1.0, 0.0, 1.0, None, 1.0]
    assert ours[f"{OPEN_R1}:format_reward"] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert ours[f"{OPEN_R1}:get_soft_overlong_punishment"] == [0.0, 0.0, -0.75, 0.0, -1.0]
