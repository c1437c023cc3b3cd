"""Reading local dataset files (jsonl, json, parquet); malformed rows are skipped and counted.

    rows, skipped = read_rows("data/gsm8k", split="test")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz")


def find_split_file(path: str | Path, split: str) -> Path:
    """``path`` itself when it is a file, else ``path/<split>.{jsonl,json,parquet,jsonl.gz}``."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"dataset path {str(p)!r} does not exist")
    for suffix in SUFFIXES:
        cand = p / f"{split}{suffix}"
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"no file for split {split!r} in {str(p)!r} (looked for {split}{{{','.join(SUFFIXES)}}}); "
        f"present: {sorted(x.name for x in p.iterdir())}"
    )


class DataError(ValueError):
    """A dataset that cannot be used (unreadable file, no usable rows); the message names the file and counts."""


def read_rows(path: str | Path, split: str) -> tuple[list[dict[str, Any]], int]:
    """Rows of a local file as dicts, and how many lines were skipped because they did not parse.

    A ``.json`` file is a list of objects (or ``{"data": [...]}``); one that does not parse as a whole is read
    as JSON lines, so its malformed lines are skipped and counted like a ``.jsonl`` file's. An unreadable file
    (corrupt parquet or gzip, not UTF-8) is a :class:`DataError` naming it."""
    f = find_split_file(path, split)
    name = f.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(f).to_pylist(), 0
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"cannot read parquet file {str(f)!r}: {err}") from None
    try:
        if name.endswith(".gz"):
            import gzip

            with gzip.open(f, "rt") as fh:
                text = fh.read()
        else:
            text = f.read_text()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read dataset file {str(f)!r}: {err}") from None
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            log.warning("%s: not one JSON document (%s at line %d); reading it as JSON lines", f, err.msg, err.lineno)
        else:
            rows = data if isinstance(data, list) else data.get("data", [data]) if isinstance(data, dict) else [data]
            good = [r for r in rows if isinstance(r, dict)]
            return good, len(rows) - len(good)
    return _json_lines(f, text)


def _json_lines(f: Path, text: str) -> tuple[list[dict[str, Any]], int]:
    """The JSON-object lines of ``text`` (blank lines ignored) and the count of malformed ones (logged)."""
    rows: list[dict[str, Any]] = []
    skipped = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            skipped += 1
            log.warning("%s:%d: skipped malformed line (%s)", f, lineno, err.msg)
            continue
        if not isinstance(row, dict):
            skipped += 1
            log.warning("%s:%d: skipped a line that is not a JSON object", f, lineno)
            continue
        rows.append(row)
    return rows, skipped
