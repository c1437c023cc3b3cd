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


def test_bad_override_exits_with_the_key_named() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rl_small.cli", "train", "rollout.groupsize=4"], capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "unknown key 'rollout.groupsize'" in out.stderr


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
