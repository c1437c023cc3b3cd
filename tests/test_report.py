"""``rl-small report``: curves and tables from run directories, several runs compared on one page."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _fake_run(path: Path, acc: list[float], before: float, after: float) -> Path:
    path.mkdir(parents=True)
    lines = [json.dumps({"step": i + 1, "reward/total": a + 0.1, "reward/math_accuracy": a, "rollout/len_mean": 30 - i,
                         "loss/clip_frac": 0.01, "eval/gsm8k/pass@1": a / 2})
             for i, a in enumerate(acc)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "rew')  # killed mid-write
    (path / "summary.json").write_text(json.dumps({"before": {"accuracy": before, "n": 100},
                                                   "after": {"accuracy": after, "n": 100}}))
    return path


def test_report_compares_runs(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "grpo", [0.1, 0.2, 0.4], 0.2, 0.45)
    b = _fake_run(tmp_path / "memory", [0.1, 0.3, 0.5], 0.2, 0.5)
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "rl_small.cli", "report", str(a), str(b), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    page = (out / "report.html").read_text()
    assert "<td>grpo</td><td>20.0%</td><td>45.0%</td><td>+25.0</td>" in page
    assert "<td>memory</td><td>20.0%</td><td>50.0%</td><td>+30.0</td>" in page
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["eval_gsm8k_pass@1.png", "loss_clip_frac.png", "reward_math_accuracy.png", "reward_total.png",
                    "rollout_len_mean.png"]
    assert page.count("data:image/png;base64,") == 5  # self-contained


def test_report_on_a_non_run_names_the_path(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rl_small.cli", "report", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "nope" in proc.stderr and "metrics.jsonl" in proc.stderr
