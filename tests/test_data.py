"""Tasks: the built-in arith generator, local files with malformed rows, the shared GSM8K/MATH-500 copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl_small.config import DataConfig
from rl_small.data import build_prompts, load_task_rows
from rl_small.data.arith import generate_arith
from tests.conftest import SHARED_DATA


def test_arith_is_seeded_and_splits_are_disjoint() -> None:
    train = generate_arith("train", 2000, difficulty=1, seed=0)
    again = generate_arith("train", 2000, difficulty=1, seed=0)
    evals = generate_arith("eval", 300, difficulty=1, seed=0)
    other_seed = generate_arith("train", 2000, difficulty=1, seed=1)
    assert train == again
    assert len({r["question"] for r in train}) == 2000
    assert not {r["question"] for r in train} & {r["question"] for r in evals}
    assert not {r["question"] for r in other_seed} & {r["question"] for r in evals}  # whatever the seed


@pytest.mark.parametrize("difficulty", [1, 2, 4])
def test_arith_answers_follow_the_story(difficulty: int) -> None:
    import re

    for row in generate_arith("eval", 50, difficulty=difficulty):
        sentences = row["question"].split(". ")
        value = int(re.search(r"has (\d+)", sentences[0]).group(1))
        for s in sentences[1:-1] if len(sentences) > 2 else sentences[1:]:
            if "doubles" in s:
                value *= 2
            elif (m := re.search(r"(buys|finds|gets|wins) (\d+)", s)) is not None:
                value += int(m.group(2))
            elif (m := re.search(r"(gives|loses|eats|sells) (\d+)", s)) is not None:
                value -= int(m.group(2))
        assert str(value) == row["answer"] and value >= 0
        assert row["question"].count("Then") == difficulty


def test_arith_rejects_bad_knobs() -> None:
    with pytest.raises(ValueError, match="difficulty must be in 1..6, got 9"):
        generate_arith("train", 1, difficulty=9)
    with pytest.raises(ValueError, match="'dev'"):
        generate_arith("dev", 1)


def test_local_gsm8k_skips_and_counts_malformed_rows(tmp_path: Path) -> None:
    lines = [
        json.dumps({"question": "1+1?", "answer": "one plus one\n#### 2"}),
        "{not json",
        json.dumps({"question": "no gold", "answer": "forgot the marker"}),
        json.dumps({"answer": "#### 3"}),
        json.dumps([1, 2]),
        json.dumps({"question": "big", "answer": "#### 1,234"}),
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    rows, stats = load_task_rows(DataConfig(task="gsm8k", path=str(tmp_path)), "train")
    assert [r["answer"] for r in rows] == ["2", "1234"]
    assert (stats.kept, stats.skipped) == (2, 4)


def test_missing_split_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        load_task_rows(DataConfig(task="gsm8k", path=str(tmp_path)), "test")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_task_rows(DataConfig(task="gsm8k", path=str(tmp_path / "nowhere")), "test")


def test_unknown_task_is_named() -> None:
    with pytest.raises(KeyError, match="'gsm9k'"):
        load_task_rows(DataConfig(task="gsm9k"), "train")


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k").is_dir(), reason="../shared/data/gsm8k not present")
def test_shared_gsm8k_test_loads_fully() -> None:
    rows, stats = load_task_rows(DataConfig(task="gsm8k", path=str(SHARED_DATA / "gsm8k")), "test")
    assert (stats.kept, stats.skipped) == (1319, 0)
    assert all("," not in r["answer"] for r in rows)


@pytest.mark.skipif(not (SHARED_DATA / "math500").is_dir(), reason="../shared/data/math500 not present")
def test_shared_math500_loads_fully() -> None:
    rows, stats = load_task_rows(DataConfig(task="math500", path=str(SHARED_DATA / "math500")), "test")
    assert stats.kept == 500


def test_prompts_use_template_and_chat_template(tiny_model_dir: Path) -> None:
    from rl_small.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    rows = generate_arith("train", 2, 1)
    prompts = build_prompts(rows, tok, DataConfig(template="boxed", system_prompt="Be brief."))
    assert prompts[0].text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "\\boxed{}" in prompts[0].text and prompts[0].text.endswith("<|im_start|>assistant\n")
    assert prompts[0].answer == rows[0]["answer"]
    with pytest.raises(KeyError, match="'nope'"):
        build_prompts(rows, tok, DataConfig(template="nope"))


def test_malformed_json_file_is_read_as_lines_skipping_and_counting(tmp_path: Path) -> None:
    from rl_small.data.files import read_rows

    good = json.dumps({"question": "1+1?", "answer": "#### 2"})
    (tmp_path / "train.json").write_text(f"{good}\n{{broken\n{good}\n")  # JSON lines named .json, one broken
    rows, skipped = read_rows(tmp_path, "train")
    assert len(rows) == 2 and skipped == 1
    (tmp_path / "train.json").write_text(json.dumps([{"question": "q", "answer": "#### 1"}, 7]))
    rows, skipped = read_rows(tmp_path, "train")
    assert len(rows) == 1 and skipped == 1


def test_corrupt_parquet_and_empty_datasets_are_data_errors_naming_file_and_counts(tmp_path: Path) -> None:
    from rl_small.data.files import DataError

    (tmp_path / "train.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=rf"cannot read parquet file '{tmp_path / 'train.parquet'}'"):
        load_task_rows(DataConfig(task="gsm8k", path=str(tmp_path)), "train")
    (tmp_path / "test.jsonl").write_text("{bad\n" + json.dumps({"question": "no gold", "answer": "x"}) + "\n")
    with pytest.raises(DataError, match=r"'gsm8k' split 'test' \('.*test.jsonl'\): no usable rows: 1 read, 2 skipped"):
        load_task_rows(DataConfig(task="gsm8k", path=str(tmp_path)), "test")
    (tmp_path / "eval.jsonl").write_text("")
    with pytest.raises(DataError, match=r"no usable rows: 0 read, 0 skipped"):
        load_task_rows(DataConfig(task="gsm8k", path=str(tmp_path)), "eval")


def test_hub_split_names_follow_each_dataset(monkeypatch) -> None:  # noqa: ANN001
    """HuggingFaceH4/aime_2024 has only a "train" split: its test set is asked for by that name."""
    import datasets

    from rl_small.config import DataConfig
    from rl_small.data.registry import load_task_rows

    asked: list[tuple[str, str | None]] = []

    def fake_load(hub_id: str, config: str | None = None, split: str | None = None) -> list[dict]:
        asked.append((hub_id, split))
        return [{"problem": "What is 1+1?", "answer": "2", "id": 1}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows, _ = load_task_rows(DataConfig(task="aime24"), "test")
    assert asked == [("HuggingFaceH4/aime_2024", "train")] and rows[0]["answer"] == "2"
    load_task_rows(DataConfig(task="aime25"), "test")
    assert asked[-1] == ("math-ai/aime25", "test")
