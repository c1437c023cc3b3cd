"""train's held-out evaluations: ``eval_before.jsonl`` is saved beside ``eval_after.jsonl`` and the summary (and
final table / log) compares them problem by problem."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from rl_small.eval import paired

TOKEN_REWARD = "rewards=[{name: 'tests.helpers:token_reward'}]"
FAKE = ["rollout.backend=fake", "rollout.fake_completions=['1', '22', '3 4', '5 6 7']"]


def test_paired_counts_by_hand() -> None:
    before = [{"id": i, "correct": c} for i, c in zip("abcde", [True, True, False, False, True])]
    after = [{"id": i, "correct": c} for i, c in zip("abcdf", [True, False, True, False, True])]  # f: not in before
    assert paired(before, after) == {"problems": 4, "both": 1, "before_only": 1, "after_only": 1, "neither": 1}


def test_train_saves_eval_before_and_reports_the_pairs(tiny_overrides: list[str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import rl_small.eval
    from rl_small.train import run

    real = rl_small.eval.evaluate
    script = iter([[True, True, False, False], [True, False, True, True]])  # before, after (by problem)

    def graded(*args: Any, **kwargs: Any) -> Any:  # the real evaluation, its grades replaced by the script
        result = real(*args, **kwargs)
        for sample, correct in zip(result.samples, next(script)):
            sample["correct"] = correct
        return result

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("rl_small.train").addHandler(handler)
    monkeypatch.setattr(rl_small.eval, "evaluate", graded)
    overrides = [*[o for o in tiny_overrides if not o.startswith(("train.eval_after", "train.eval_before"))],
                 TOKEN_REWARD, *FAKE, "train.eval_before=true", "train.eval_after=true", "train.eval_samples=4"]
    try:
        summary = run(argparse.Namespace(recipe=None, resume=None, overrides=overrides))
    finally:
        logging.getLogger("rl_small.train").removeHandler(handler)
    run_dir = tmp_path / "t"
    before = [json.loads(x) for x in (run_dir / "eval_before.jsonl").read_text().splitlines()]
    after = [json.loads(x) for x in (run_dir / "eval_after.jsonl").read_text().splitlines()]
    assert [s["correct"] for s in before] == [True, True, False, False] and len(after) == 4
    assert [s["id"] for s in before] == [s["id"] for s in after]
    expected = {"problems": 4, "both": 1, "before_only": 1, "after_only": 2, "neither": 0}
    assert summary["paired"] == expected == json.loads((run_dir / "summary.json").read_text())["paired"]
    assert any("1 solved before and after, 1 before only, 2 after only, 0 neither (of 4)" in x for x in lines)
