"""CLI: --help does not import the heavy stack; errors name the bad value; the train entry point works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_help_defers_heavy_imports() -> None:
    code = (
        "import sys\n"
        "from rl_small.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate', 'vllm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout


def test_bad_override_exits_with_the_key_named(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rl_small.cli", "train", "rollout.groupsize=4"], capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "unknown key 'rollout.groupsize'" in out.stderr


def test_bad_task_and_missing_data_exit_with_the_value_named(tmp_path: Path) -> None:
    for override, expected in (
        ("data.task=gsm9k", "unknown task 'gsm9k'"),
        (f"data.path={tmp_path / 'nowhere'}", "nowhere"),
    ):
        args = ["train", f"train.output_dir={tmp_path}", override]
        if "path" in override:
            args.append("data.task=gsm8k")
        out = subprocess.run([sys.executable, "-m", "rl_small.cli", *args], capture_output=True, text=True)
        assert out.returncode != 0 and expected in out.stderr, out.stderr[-1000:]


def test_train_entry_point_runs_and_writes_the_run_dir(tiny_overrides: list[str], tmp_path: Path) -> None:
    overrides = [o for o in tiny_overrides if not o.startswith("train.eval_")] + ["train.eval_samples=4"]
    out = subprocess.run(
        [sys.executable, "-m", "rl_small.train", *overrides], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "t"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / "step_000002" / "trainable.pt").exists()
    import json

    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["before"]["accuracy"] <= 1 and summary["after"]["n"] == 4


def test_runs_under_accelerate_launch(tiny_overrides: list[str], tmp_path: Path) -> None:
    import shutil

    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher, "accelerate CLI missing"
    cmd = [
        launcher, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "rl_small.train", *tiny_overrides,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


def _train_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``rl-small train argv`` in this process; assert exit code 1 and no traceback; its stderr."""
    from rl_small.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    out = capsys.readouterr()
    assert exc.value.code == 1, out.err[-2000:]
    assert "Traceback" not in out.err + out.out
    return out.err


def test_malformed_recipe_yaml_is_one_line_naming_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 3\n  seed: [1, 2\n")
    err = _train_error(["--recipe", str(recipe)], capsys)
    assert err.startswith(f"rl-small: error: malformed YAML in {recipe}, line 4")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("train.jsonl", "", r"no usable rows: 0 read, 0 skipped"),
        ("train.jsonl", '{"question": "q"}\n{oops\n', r"no usable rows: 1 read, 2 skipped"),
        ("train.json", '[{"question": "q", "answer": "no marker"}, 3]', r"no usable rows: 1 read, 2 skipped"),
        ("train.json", '{"question": "q",\n "answer": ', r"no usable rows: 0 read, 2 skipped"),
        ("train.parquet", "PAR1 not a parquet file", r"cannot read parquet file '.*train.parquet'"),
    ],
)
def test_unusable_datasets_are_one_line_errors(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: str,
    expected: str,
) -> None:
    import re

    data = tmp_path / "data"
    data.mkdir()
    (data / name).write_text(content)
    err = _train_error([*tiny_overrides, "data.task=gsm8k", f"data.path={data}"], capsys)
    assert err.startswith("rl-small: error: ") and re.search(expected, err), err
    if "rows" in expected:
        assert f"task 'gsm8k' split 'train' ('{data / name}')" in err


def test_unwritable_output_directory_is_named(tiny_overrides: list[str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _train_error([*tiny_overrides, f"train.output_dir={blocker / 'runs'}"], capsys)
    assert err.startswith(f"rl-small: error: cannot write the run directory '{blocker / 'runs' / 't'}'")


def test_nonfinite_and_late_validation_settings_fail_before_training(tiny_overrides: list[str], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    err = _train_error([*tiny_overrides, "train.eval_max_new_tokens=-5"], capsys)
    assert "train.eval_max_new_tokens" in err and "got -5" in err
    err = _train_error([*tiny_overrides, "optim.betas=[1.5,2]"], capsys)
    assert "optim.betas" in err
    assert not (tmp_path / "t").exists(), "a run directory was created for an invalid config"


@pytest.mark.parametrize("content", ["{}", "not json", '{"r": 4}'])
def test_eval_of_a_broken_adapter_folder_is_one_line(tmp_path: Path, content: str) -> None:
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(content)
    (tmp_path / "run" / "config.yaml").write_text("name: x\n")
    for args in (["--model", "nowhere", "--adapter", str(adapter)], ["--run", str(tmp_path / "run")]):
        out = subprocess.run([sys.executable, "-m", "rl_small.cli", "eval", *args, "--benchmarks", "gsm8k"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert f"rl-small eval: error: adapter config '{adapter / 'adapter_config.json'}'" in out.stderr


def test_eval_into_an_unwritable_output_folder_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = subprocess.run([sys.executable, "-m", "rl_small.cli", "eval", "--model", "nowhere", "--benchmarks", "gsm8k",
                          "--out", str(blocker / "x")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "rl-small eval: error:" in out.stderr and str(blocker / "x") in out.stderr
