"""The ``trl`` task: datasets in TRL's standard (``prompt`` a string) and conversational (``prompt`` a list of
{role, content} messages) formats, with the answer column named in the recipe, rewarded by math_accuracy; and
``data.path`` given to a task that cannot read it is a config error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl_small.config import RecipeError, load_recipe
from rl_small.data import build_prompts, load_task_rows

# trl-lib/DeepMath-103K: `prompt` = [{content, role}] (conversational), `solution` = the final answer.
DEEPMATH_ROWS = [
    {"prompt": [{"content": "Evaluate the limit: \\[ \\lim_{x \\to 0} \\frac{\\sin 2x}{x} \\]", "role": "user"}],
     "solution": "2"},
    {"prompt": [{"content": "You are a careful mathematician.", "role": "system"},
                {"content": "Find the sum of the first 10 positive integers.", "role": "user"}],
     "solution": "55"},
    {"prompt": [{"content": "Compute \\int_0^1 x \\, dx.", "role": "user"}], "solution": "\\dfrac{1}{2}"},
    {"prompt": [], "solution": "3"},  # malformed: no user turn
]
# open-r1/OpenR1-Math-220k (default config): `problem`, a worked `solution` ending in \boxed{}, `answer`, ...
OPENR1_ROWS = [
    {"problem": "If $x + 3 = 5$, what is $x$?", "solution": "Subtract 3: $x = \\boxed{2}$.", "answer": "2",
     "problem_type": "Algebra", "question_type": "math-word-problem", "source": "olympiads",
     "uuid": "0b3c9e4a-1f7e-5a4e-9a2d-3f1c2b7e8d90", "is_reasoning_complete": [True], "generations": ["..."],
     "correctness_math_verify": [True], "correctness_llama": None, "finish_reasons": None,
     "correctness_count": 1, "messages": [{"role": "user", "content": "If $x + 3 = 5$, what is $x$?"}]},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_conversational_rows_as_trl_lib_ships_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    pq.write_table(pa.Table.from_pylist(DEEPMATH_ROWS), tmp_path / "train.parquet")
    cfg = load_recipe(None, ["data.task=trl", f"data.path={tmp_path}", "data.answer_field=solution"]).data
    rows, stats = load_task_rows(cfg, "train")
    assert (stats.kept, stats.skipped) == (3, 1)
    assert [(r["question"][:13], r["answer"]) for r in rows] == [
        ("Evaluate the ", "2"), ("Find the sum ", "55"), ("Compute \\int_", "\\dfrac{1}{2}")]
    prompts = build_prompts(rows, AutoTokenizer.from_pretrained(tiny_model_dir), cfg)
    # the messages through the chat template as they are: their own system turn, not data.system_prompt
    assert prompts[1].text == ("<|im_start|>system\nYou are a careful mathematician.<|im_end|>\n<|im_start|>user\n"
                               "Find the sum of the first 10 positive integers.<|im_end|>\n<|im_start|>assistant\n")
    assert "concise math assistant" not in prompts[0].text


def test_standard_string_prompts_and_openr1_columns(tmp_path: Path) -> None:
    std = _jsonl(tmp_path / "std.jsonl", [{"prompt": "What is 6 times 7?", "completion_hint": "x", "solution": "42"}])
    cfg = load_recipe(None, ["data.task=trl", f"data.path={std}", "data.answer_field=solution"]).data
    assert [(r["question"], r["answer"]) for r in load_task_rows(cfg, "train")[0]] == [("What is 6 times 7?", "42")]
    openr1 = _jsonl(tmp_path / "openr1.jsonl", OPENR1_ROWS)
    cfg = load_recipe(None, ["data.task=trl", f"data.path={openr1}", "data.prompt_field=problem",
                             "data.answer_field=solution"]).data
    rows = load_task_rows(cfg, "train")[0]
    assert [(r["question"], r["answer"]) for r in rows] == [("If $x + 3 = 5$, what is $x$?", "2")]  # its \boxed{}


def test_a_path_the_task_cannot_read_and_a_missing_answer_column_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"data\.path: .*task 'arith' generates its problems.*remove data\.path"):
        load_recipe(None, [f"data.path={tmp_path}"])  # the default task is arith: the path was silently ignored
    cfg = load_recipe(None, ["data.task=trl", f"data.path={tmp_path}"]).data
    with pytest.raises(KeyError, match="data.answer_field"):
        load_task_rows(cfg, "train")
    # a data.mix entry (the trainer copies data with the entry's task and path, past the config's check)
    with pytest.raises(KeyError, match="given to task 'arith'"):
        load_task_rows(load_recipe(None).data.model_copy(update={"path": str(tmp_path)}), "train")


def test_training_on_trl_rows_is_rewarded_by_math_accuracy(tiny_overrides: list[str], tmp_path: Path) -> None:
    from rl_small.trainer import Trainer

    rows = [{"prompt": [{"role": "user", "content": f"What is {i} - {i} + 2?"}], "solution": "2"} for i in range(8)]
    data = _jsonl(tmp_path / "deepmath.jsonl", rows)
    cfg = load_recipe(None, [*tiny_overrides, "data.task=trl", f"data.path={data}", "data.answer_field=solution",
                             "rewards=[{name: math_accuracy}]", "rollout.backend=fake", "train.steps=1",
                             "rollout.fake_completions=['so \\\\boxed{2}', '\\\\boxed{3}', '\\\\boxed{2}', '2 or 5']"])
    tr = Trainer(cfg, tmp_path / "run")
    assert tr.data_stats.kept == 8 and "What is" in tr.train_prompts[0].text
    tr.fit()
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["reward/math_accuracy"] == pytest.approx(0.5)  # 2 of each 4 completions are right


@pytest.mark.parametrize(("where", "hub"), [
    ("trl-lib/DeepMath-103K", True), ("open-r1/OpenR1-Math-220k", True), ("data/deepmath.jsonl", False),
    ("./trl-lib/DeepMath-103K", False), ("a/b/c", False), ("deepmath", False),
])
def test_a_path_that_is_no_local_file_and_looks_like_owner_name_is_a_hub_id(where: str, hub: bool) -> None:
    from rl_small.data.registry import hub_like

    assert hub_like(where) is hub


def test_a_missing_path_read_as_a_hub_id_says_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rl_small.data import registry
    from rl_small.data.files import DataError

    def unreachable(task: object, split: str) -> list:
        raise DataError("hub dataset 'nobody/nothing' split 'train' is not available (offline)")

    monkeypatch.setattr(registry, "_hub_rows", unreachable)  # as offline, without touching the network
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(None, ["data.task=trl", "data.path=nobody/nothing", "data.answer_field=solution"]).data
    with pytest.raises(DataError, match="'nobody/nothing' is no local file or folder, and as a hub dataset"):
        load_task_rows(cfg, "train")
