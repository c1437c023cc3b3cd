"""A bare clone stands alone: no path outside the checkout, the README's first command resolves, and
``rl-small data download`` writes the layout that ``--data-dir`` / ``data.path`` read (hub loader faked)."""

from __future__ import annotations

import gzip
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SCANNED = ("README.md", "recipes", "rl_small", "rewards", "bench", "launch", "docs", "pyproject.toml")


def _text_files() -> list[Path]:
    out = []
    for name in SCANNED:
        p = ROOT / name
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and f.suffix in
                                         (".md", ".py", ".yaml", ".yml", ".sh", ".sbatch", ".toml", ".txt", "")]
        out += [f for f in files if "results" not in f.parts and "__pycache__" not in f.parts]
    return out


def test_no_reference_outside_the_checkout() -> None:
    bad = []
    for f in _text_files():
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if "../shared" in line or "/work/shared" in line or re.search(r"(?<![/\w])(METHODS|DESIGN)\.md", line):
                bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not bad, "references outside the repository (use docs/...):\n" + "\n".join(bad)
    assert (ROOT / "docs" / "DESIGN.md").is_file() and (ROOT / "docs" / "METHODS.md").is_file()


def test_readme_first_command_resolves_in_a_bare_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first README command's ``rl-small train ...`` parses and resolves to a config that needs no file
    beside the checkout (built-in model alias, built-in task, no data path), from an empty working folder."""
    import argparse

    from rl_small.config import load_recipe
    from rl_small.train import add_train_args

    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    cmd = block.strip().split("&&")[-1].strip()
    argv = shlex.split(cmd)
    assert argv[:2] == ["rl-small", "train"], cmd
    p = argparse.ArgumentParser()
    add_train_args(p)
    args = p.parse_args(argv[2:])
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(args.recipe, args.overrides)
    assert cfg.data.task == "arith" and cfg.data.path is None
    assert cfg.model.name == "smollm2-135m-instruct"


def test_readme_data_paths_are_the_download_layout() -> None:
    """Every ``--data-dir X`` / ``data.path=X`` in README and the recipes names what the downloader writes."""
    from rl_small.data.download import LAYOUT

    folders = {f.path.split("/")[0] for files in LAYOUT.values() for f in files}
    texts = [README.read_text()] + [p.read_text() for p in (ROOT / "recipes").rglob("*.yaml")]
    dirs = [m for t in texts for m in re.findall(r"--data-dir (\S+)", t) if not m.startswith("DIR")]  # placeholders
    paths = [m.rstrip(")`,") for t in texts for m in re.findall(r"data\.path=(\S+)", t) if not m.startswith("DIR")]
    assert dirs and paths
    assert set(dirs) == {"data"}, dirs
    for p in paths:
        if re.fullmatch(r"[\w-]+/[\w.-]+", p) and not p.startswith("data/"):  # a hub id (data.task=trl)
            from rl_small.data.registry import hub_like

            assert hub_like(p), p
            continue
        assert p.split("/")[0] == "data" and p.split("/")[1] in folders, p


def _hub_row(task: str, split: str, i: int) -> dict:
    """A row in the hub dataset's own columns."""
    if task == "gsm8k":
        return {"question": f"q{i}?", "answer": f"work\n#### {i}"}
    if task in ("math", "math500"):
        return {"problem": f"p{i}", "solution": f"so \\boxed{{{i}}}", "unique_id": f"{split}/{i}"}
    if task in ("aime24", "aime25", "amc23"):
        return {"problem": f"p{i}", "answer": str(i)}
    if task == "humaneval":
        return {"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "canonical_solution": "  return 1\n",
                "test": "def check(c):\n  assert c() == 1\n", "entry_point": f"f{i}"}
    start = {"prompt": 1, "test": 11, "validation": 511, "train": 601}[split]
    return {"task_id": start + i, "prompt": f"write f{i}", "code": "def f(): return 1",
            "test_list": ["assert f() == 1"]}


def test_download_writes_the_layout_the_readers_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rl_small.config import DataConfig
    from rl_small.data import load_task_rows, registry
    from rl_small.data.download import download
    from rl_small.eval.benchmarks import BENCHMARKS

    calls = []

    def fake_hub(task, split):
        calls.append((task.hub_id, split))
        return [_hub_row(task.name, split, i) for i in range(3)]

    monkeypatch.setattr(registry, "_hub_rows", fake_hub)
    written = download(tmp_path)
    rel = sorted(str(p.relative_to(tmp_path)) for p in written)
    assert rel == sorted(["gsm8k/train.jsonl", "gsm8k/test.jsonl", "math/train.jsonl", "math/test.jsonl",
                          "math500/test.jsonl", "aime24/test.jsonl", "aime25/test.jsonl", "amc23/test.jsonl",
                          "humaneval/HumanEval.jsonl.gz", "mbpp/sanitized-mbpp.json"])
    assert ("HuggingFaceH4/aime_2024", "train") in calls  # its only hub split
    assert not list(tmp_path.rglob(".tmp-*"))
    # the formats the names promise
    assert len(json.loads((tmp_path / "mbpp/sanitized-mbpp.json").read_text())) == 12  # 4 splits x 3
    with gzip.open(tmp_path / "humaneval/HumanEval.jsonl.gz", "rt") as fh:
        assert len(fh.read().splitlines()) == 3
    # every benchmark reads it through --data-dir's rule (<data_dir>/<local>), every split it evaluates on
    for bench in BENCHMARKS.values():
        rows, stats = load_task_rows(DataConfig(task=bench.task, path=str(tmp_path / bench.local)), bench.split)
        assert len(rows) == 3 and stats.skipped == 0, bench.name
    rows, _ = load_task_rows(DataConfig(task="gsm8k", path=str(tmp_path / "gsm8k")), "train")
    assert [r["answer"] for r in rows] == ["0", "1", "2"]
    rows, _ = load_task_rows(DataConfig(task="math", path=str(tmp_path / "math")), "test")
    assert [r["answer"] for r in rows] == ["0", "1", "2"]


def test_download_cli_names_an_unknown_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rl_small.cli import main

    with pytest.raises(SystemExit) as err:
        main(["data", "download", "--out", str(tmp_path), "--only", "gsm8k,nope"])
    assert err.value.code == 1
    assert "rl-small data: error: unknown dataset(s) ['nope']" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_readme_says_the_default_model_is_a_dequantised_gguf() -> None:
    from rl_small.config import RunConfig
    from rl_small.models import BUILTIN_MODELS

    spec = BUILTIN_MODELS[RunConfig().model.name]
    text = " ".join(README.read_text().split("## Data:", 1)[0].split())
    assert f"`{spec.gguf_file}`" in text and f"`{spec.pip_name}`" in text
    assert "dequantised" in text and "not HuggingFace's original bf16" in text
