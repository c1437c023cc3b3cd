"""``rl-small data download --out DIR``: write the local data layout that ``--data-dir`` / ``data.path`` read.

    rl-small data download --out data                       # every dataset below, from the HF hub
    rl-small data download --out data --only gsm8k,math500  # some of them
    rl-small eval --model smollm2-135m-instruct --benchmarks gsm8k --data-dir data   # then offline

The layout (``<DIR>/<file>``; the eval benchmarks read ``<data-dir>/<folder or file>``, a training task reads
``data.path=<DIR>/<folder>``, taking ``<split>.jsonl`` from a folder):

    gsm8k/train.jsonl, gsm8k/test.jsonl       openai/gsm8k (main)
    math/train.jsonl, math/test.jsonl         DigitalLearningGmbH/MATH-lighteval
    math500/test.jsonl                        HuggingFaceH4/MATH-500
    aime24/test.jsonl                         HuggingFaceH4/aime_2024 (its only split, "train")
    aime25/test.jsonl                         math-ai/aime25
    amc23/test.jsonl                          math-ai/amc23
    humaneval/HumanEval.jsonl.gz              openai/openai_humaneval (test; gzipped JSON lines, as OpenAI ships it)
    mbpp/sanitized-mbpp.json                  google-research-datasets/mbpp (sanitized; every split in one JSON
                                              list, as Google ships it; the split is chosen by task id)

Rows are written as the hub gives them (the tasks' readers accept the hub's columns). Needs ``datasets`` and
network; a file is written under a temporary name and renamed, so an interrupted download leaves no partial file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalFile:
    """One file of the layout: which task's hub dataset fills it, from which hub splits."""

    path: str  # relative to the output folder
    task: str
    hub_splits: tuple[str, ...]


LAYOUT: dict[str, tuple[LocalFile, ...]] = {
    "gsm8k": (LocalFile("gsm8k/train.jsonl", "gsm8k", ("train",)), LocalFile("gsm8k/test.jsonl", "gsm8k", ("test",))),
    "math": (LocalFile("math/train.jsonl", "math", ("train",)), LocalFile("math/test.jsonl", "math", ("test",))),
    "math500": (LocalFile("math500/test.jsonl", "math500", ("test",)),),
    "aime24": (LocalFile("aime24/test.jsonl", "aime24", ("train",)),),
    "aime25": (LocalFile("aime25/test.jsonl", "aime25", ("test",)),),
    "amc23": (LocalFile("amc23/test.jsonl", "amc23", ("test",)),),
    "humaneval": (LocalFile("humaneval/HumanEval.jsonl.gz", "humaneval", ("test",)),),
    "mbpp": (LocalFile("mbpp/sanitized-mbpp.json", "mbpp", ("prompt", "test", "validation", "train")),),
}


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """A hub row as plain JSON (non-JSON values such as dates become strings)."""
    return json.loads(json.dumps(row, default=str))


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` in the format the name says (``.json`` list, ``.jsonl``, ``.jsonl.gz``), atomically."""
    rows = [_jsonable(r) for r in rows]
    if path.name.endswith(".json"):
        data = json.dumps(rows, ensure_ascii=False, indent=1).encode()
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        if path.name.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def download(out: str | Path, only: list[str] | None = None) -> list[Path]:
    """Fetch the datasets ``only`` names (default: all of :data:`LAYOUT`) from the hub into ``out``; the paths."""
    from rl_small.data import registry

    names = list(LAYOUT) if not only else only
    unknown = [n for n in names if n not in LAYOUT]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; known: {', '.join(LAYOUT)}")
    written = []
    for name in names:
        for f in LAYOUT[name]:
            task = registry.TASKS[f.task]
            rows = [r for split in f.hub_splits for r in registry._hub_rows(task, split)]
            if not rows:
                raise ValueError(f"{task.hub_id} ({'+'.join(f.hub_splits)}) gave no rows for {f.path}")
            write_rows(Path(out) / f.path, rows)
            log.info("%s: %d rows from %s", Path(out) / f.path, len(rows), task.hub_id)
            written.append(Path(out) / f.path)
    return written


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["download"])
    p.add_argument("--out", default="data", help="output folder (default: ./data)")
    p.add_argument("--only", help=f"comma-separated datasets (default: all): {', '.join(LAYOUT)}")


def run_data(args: argparse.Namespace) -> int:
    """``rl-small data download``: 0, or a one-line error (unknown name, no network, unwritable folder)."""
    from rl_small.tracking import setup_logging

    setup_logging()
    try:
        download(args.out, args.only.split(",") if args.only else None)
    except (ValueError, OSError) as err:
        sys.stderr.write(f"rl-small data: error: {err}\n")
        return 1
    return 0
