"""CLI: --help does not import the heavy stack; errors name the bad value; the train entry point works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


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
