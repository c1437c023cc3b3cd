"""Task registry: a task turns a split into rows ``{id, question, answer, ...}``.

    rows, stats = load_task_rows(cfg.data, "train")
    prompts = build_prompts(rows, tokenizer, cfg.data)

Tasks read a local file/folder when ``data.path`` is set and the HF hub otherwise (for users with a hub).
A row that lacks its question or gold answer is skipped and counted (``stats.skipped``), never fatal.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl_small.data.arith import generate_arith
from rl_small.data.files import DataError, find_split_file, read_rows
from rl_small.data.templates import render_messages, render_prompt
from rl_small.types import Prompt

if TYPE_CHECKING:
    from rl_small.config import DataConfig

log = logging.getLogger(__name__)


@dataclass
class LoadStats:
    """How many rows a load kept and skipped (malformed lines + rows missing a field)."""

    kept: int = 0
    skipped: int = 0


@dataclass(frozen=True)
class Task:
    """A dataset: where it lives on the hub and how to turn one raw row into ``(question, answer)``."""

    name: str
    hub_id: str | None
    hub_config: str | None
    to_item: Callable[[dict[str, Any]], tuple[str, str] | None]
    # For a local file holding every split (MBPP's sanitized-mbpp.json): is this row in ``split``?
    in_split: Callable[[dict[str, Any], str], bool] | None = None
    grader: str = "math_accuracy"  # the reward that grades held-out answers
    # The hub dataset's name for a split when it differs (HuggingFaceH4/aime_2024 has only "train")
    hub_splits: dict[str, str] = dataclasses.field(default_factory=dict)


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task; names are unique."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def gsm8k_gold(solution: str) -> str | None:
    """GSM8K gold: the text after the last '####', commas removed."""
    if "####" not in solution:
        return None
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return gold or None


def _gsm8k_item(row: dict[str, Any]) -> tuple[str, str] | None:
    q, a = row.get("question"), row.get("answer")
    if not isinstance(q, str) or not isinstance(a, str) or not q.strip():
        return None
    gold = gsm8k_gold(a)
    return (q, gold) if gold else None


def _math_item(row: dict[str, Any]) -> tuple[str, str] | None:
    from rewards.math import last_boxed

    q = row.get("problem")
    gold = row.get("answer")
    if not gold and isinstance(row.get("solution"), str):
        gold = last_boxed(row["solution"])
    if not isinstance(q, str) or not q.strip() or not gold:
        return None
    return q, str(gold)


def _aime_item(row: dict[str, Any]) -> tuple[str, str] | None:
    q = row.get("problem") or row.get("question")
    gold = row.get("answer")
    if not isinstance(q, str) or gold is None or str(gold).strip() == "":
        return None
    return q, str(gold).strip()


def _humaneval_item(row: dict[str, Any]) -> tuple[str, str] | None:
    prompt, test, entry = row.get("prompt"), row.get("test"), row.get("entry_point")
    if not all(isinstance(v, str) and v.strip() for v in (prompt, test, entry)):
        return None
    question = f"Complete this Python function.\n```python\n{prompt}```"
    return question, str(row.get("canonical_solution") or "")


def _mbpp_item(row: dict[str, Any]) -> tuple[str, str] | None:
    text, tests = row.get("prompt") or row.get("text"), row.get("test_list")
    if not isinstance(text, str) or not text.strip() or not isinstance(tests, list) or not tests:
        return None
    # The usual MBPP prompt shows one test so that the function name and signature are known.
    return f"{text}\nYour code should pass this test:\n{tests[0]}", str(row.get("code") or "")


# Google's MBPP split by task id (README of google-research/mbpp): prompt 1-10, test 11-510,
# validation 511-600, train 601-974.
_MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}


def _mbpp_in_split(row: dict[str, Any], split: str) -> bool:
    if split not in _MBPP_SPLITS:
        raise KeyError(f"mbpp has no split {split!r}; known: {sorted(_MBPP_SPLITS)}")
    lo, hi = _MBPP_SPLITS[split]
    return isinstance(row.get("task_id"), int) and lo <= row["task_id"] <= hi


register_task(Task("gsm8k", "openai/gsm8k", "main", _gsm8k_item))
register_task(Task("math", "DigitalLearningGmbH/MATH-lighteval", "default", _math_item))  # all 7 subjects, train/test
register_task(Task("math500", "HuggingFaceH4/MATH-500", None, _math_item))
register_task(Task("aime24", "HuggingFaceH4/aime_2024", None, _aime_item, hub_splits={"test": "train"}))
register_task(Task("aime25", "math-ai/aime25", None, _aime_item))
register_task(Task("amc23", "math-ai/amc23", None, _aime_item))  # the 40-problem AMC23 (Qwen/SimpleRL/Tina)
register_task(Task("humaneval", "openai/openai_humaneval", None, _humaneval_item, grader="code_execution"))
register_task(Task("mbpp", "google-research-datasets/mbpp", "sanitized", _mbpp_item, _mbpp_in_split, "code_execution"))
ARITH_TASK = "arith"
TRL_TASK = "trl"  # any dataset in TRL's formats, with the answer column named in data.answer_field


def trl_task(cfg: DataConfig) -> Task:
    """TRL's dataset formats: ``data.prompt_field`` (default ``prompt``) a string (standard) or a list of
    ``{role, content}`` messages (conversational; the question is the last user turn), the gold answer in
    ``data.answer_field`` (read by :func:`gold_text`); graded by ``math_accuracy``."""
    if not cfg.answer_field:
        raise KeyError(f"task {TRL_TASK!r} needs data.answer_field: the column holding the gold answer (e.g. solution)")
    question, answer = cfg.prompt_field, cfg.answer_field

    def to_item(row: dict[str, Any]) -> tuple[str, str] | None:
        prompt, gold = row.get(question), gold_text(row.get(answer))
        if isinstance(prompt, list):
            turns = [m for m in prompt if isinstance(m, dict) and isinstance(m.get("content"), str)]
            users = [m["content"] for m in turns if m.get("role") == "user"]
            prompt = users[-1] if users and len(turns) == len(prompt) else None
        if not isinstance(prompt, str) or not prompt.strip() or gold is None:
            return None
        return prompt, gold

    return Task(TRL_TASK, None, None, to_item)


def gold_text(value: Any, kind: str = "math") -> str | None:
    """The gold answer in a dataset cell: a list gives its first element (OlympiadBench's ``final_answer``);
    ``kind="gsm8k"``: the text after the last ``####``; ``"raw"``: the text as it is; otherwise a text holding
    ``\\boxed{}`` (a worked solution, as in MATH or Minerva) gives its last boxed content, any other its text."""
    from rewards.math import last_boxed

    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    if kind == "gsm8k":
        return gsm8k_gold(text)
    return text if kind == "raw" else last_boxed(text) or text


def field_item(question: str, answer: str, kind: str = "math") -> Callable[[dict[str, Any]], tuple[str, str] | None]:
    """``to_item`` of a dataset named by its columns: the question from ``question``, the gold from ``answer``
    (read by :func:`gold_text`); used by generic benchmarks (``--benchmark name=path,question=..,answer=..``)."""

    def to_item(row: dict[str, Any]) -> tuple[str, str] | None:
        q, gold = row.get(question), gold_text(row.get(answer), kind)
        if not isinstance(q, str) or not q.strip() or gold is None:
            return None
        return q, gold

    return to_item


def _hub_rows(task: Task, split: str) -> list[dict[str, Any]]:
    """Rows of ``split`` of the task's hub dataset; an unreachable hub (offline, no cache) is a DataError."""
    import datasets

    try:
        ds = datasets.load_dataset(task.hub_id, task.hub_config, split=task.hub_splits.get(split, split))
    except (OSError, ValueError) as err:  # ConnectionError (offline / no network), missing dataset or split
        raise DataError(f"task {task.name!r}: hub dataset {task.hub_id!r} split {split!r} is not available "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    return list(ds)


def load_task_rows(cfg: DataConfig, split: str, limit: int | None = None) -> tuple[list[dict[str, Any]], LoadStats]:
    """Rows ``{id, question, answer, **raw columns}`` of ``split``; skipped rows are counted and logged."""
    if cfg.task == ARITH_TASK:
        if cfg.path is not None:  # a data.mix entry (data.path itself is refused by the config)
            raise KeyError(f"path {cfg.path!r} given to task 'arith', which generates its problems and reads no file")
        n = limit if limit is not None else cfg.num_train
        rows = generate_arith(split, n, cfg.difficulty, cfg.seed)
        return rows, LoadStats(kept=len(rows))
    if cfg.task == TRL_TASK:
        return rows_of_task(trl_task(cfg), cfg, split, limit)
    if cfg.task not in TASKS:
        raise KeyError(f"unknown task {cfg.task!r}; known: {sorted([*TASKS, ARITH_TASK, TRL_TASK])}")
    return rows_of_task(TASKS[cfg.task], cfg, split, limit)


def rows_of_task(task: Task, cfg: DataConfig, split: str, limit: int | None = None) -> tuple[list[dict[str, Any]], LoadStats]:
    """``load_task_rows`` for a task object (registered or made on the fly, as generic benchmarks are)."""
    stats = LoadStats()
    named = cfg.path  # a path that is no local file and looks like owner/name: a hub dataset id
    if cfg.path is not None and task.hub_id is None and hub_like(cfg.path):
        task, cfg = dataclasses.replace(task, hub_id=cfg.path), cfg.model_copy(update={"path": None})
    if cfg.path is not None:
        raw, stats.skipped = read_rows(cfg.path, split)
        if task.in_split is not None:
            raw = [r for r in raw if task.in_split(r, split)]
    else:
        if task.hub_id is None:
            raise DataError(f"task {task.name!r} has no hub dataset; set data.path")
        try:
            raw = _hub_rows(task, split)
        except DataError as err:
            if named is None:
                raise
            raise DataError(f"{named!r} is no local file or folder, and as a hub dataset: {err}") from None
    rows: list[dict[str, Any]] = []
    for i, r in enumerate(raw):
        item = task.to_item(r)
        if item is None:
            stats.skipped += 1
            continue
        q, a = item
        rows.append({**r, "id": str(r.get("id", r.get("unique_id", f"{task.name}-{split}-{i}"))), "question": q, "answer": a})
        if limit is not None and len(rows) >= limit:
            break
    stats.kept = len(rows)
    if stats.skipped:
        log.warning("task %s/%s: skipped %d malformed rows, kept %d", task.name, split, stats.skipped, stats.kept)
    if not rows:
        where = repr(str(find_split_file(cfg.path, split))) if cfg.path is not None else f"hub {task.hub_id}"
        raise DataError(f"task {task.name!r} split {split!r} ({where}): no usable rows: {len(raw)} read, "
                        f"{stats.skipped} skipped (malformed lines or rows without a question/answer for this task)")
    return rows, stats


def hub_like(where: str) -> bool:
    """``owner/name`` that is no local path (nor a data file name): a hub dataset id."""
    parts = where.split("/")
    return (len(parts) == 2 and all(parts) and not where.startswith((".", "~")) and not Path(where).exists()
            and not where.endswith((".jsonl", ".json", ".parquet", ".gz")))


def _render(row: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> str:
    """A TRL conversational prompt is used as it is (its own system turn, if any); the others get the template."""
    messages = row.get(cfg.prompt_field) if cfg.task == TRL_TASK else None
    if isinstance(messages, list):
        return render_messages(tokenizer, messages)
    return render_prompt(tokenizer, cfg.template, row["question"], cfg.system_prompt)


def build_prompts(rows: list[dict[str, Any]], tokenizer: Any, cfg: DataConfig) -> list[Prompt]:
    """Render rows with the configured template and the tokenizer's chat template."""
    return [
        Prompt(
            id=r["id"],
            text=_render(r, tokenizer, cfg),
            answer=r["answer"],
            columns={k: v for k, v in r.items() if k not in ("id",)},
        )
        for r in rows
    ]
