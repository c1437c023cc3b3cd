"""``rl-small report`` charts: integer step axes, the truncated share drawn, features that were off left out,
``policy/entropy`` read, and a one-line hint naming the extra when matplotlib is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rl_small.eval.report import CURVES, make_report, read_metrics, series


def _grpo_run(path: Path, steps: int = 5) -> Path:
    """A GRPO run as the trainer logs it: KL off (loss/kl 0), one epoch (loss/clip_frac 0), entropy logged."""
    path.mkdir(parents=True)
    rows = [{"step": s, "reward/total": 0.1 * s, "rollout/len_mean": 30.0 + s, "rollout/truncated_frac": 0.25 * (s % 2),
             "loss/kl": 0.0, "loss/clip_frac": 0.0, "policy/entropy": 1.0 - 0.1 * s} for s in range(1, steps + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_series_drops_features_that_were_off(tmp_path: Path) -> None:
    metrics = {r: read_metrics(r) for r in (_grpo_run(tmp_path / "a"), _grpo_run(tmp_path / "b", 3))}
    by_key = {keys[0]: series(metrics, keys, drop) for keys, _, drop in CURVES}
    assert by_key["policy/kl"] == {} and by_key["loss/clip_frac"] == {}  # KL off, on-policy: no flat lines
    assert by_key["rollout/truncated_frac"]["b"] == [(1, 0.25), (2, 0.0), (3, 0.25)]  # truncated share, zeros kept
    assert by_key["policy/entropy"]["a"][0] == (1, 0.9)
    assert by_key["reward/math_accuracy"] == {}  # never logged


def test_series_reads_the_older_metric_names(tmp_path: Path) -> None:
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss/entropy": 2.0, "loss/kl": 0.5}) + "\n")
    metrics = {run: read_metrics(run)}
    assert series(metrics, ("policy/entropy", "loss/entropy"), True) == {"old": [(1, 2.0)]}
    assert series(metrics, ("policy/kl", "loss/kl"), True) == {"old": [(1, 0.5)]}


def test_report_charts_and_integer_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from rl_small.eval import report

    ticks = {}
    real_png = report._png

    def spy(fig):
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks[ax.get_title()] = [t for t in ax.get_xticks() if lo <= t <= hi]
        return real_png(fig)

    monkeypatch.setattr(report, "_png", spy)
    run = _grpo_run(tmp_path / "grpo")
    make_report([run], tmp_path / "out")
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["policy_entropy.png", "reward_total.png", "rollout_len_mean.png", "rollout_truncated_frac.png"]
    assert ticks and all(len(t) >= 2 and all(float(x).is_integer() for x in t) for t in ticks.values()), ticks
    plt.close("all")


def test_report_without_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rl_small.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as err:
        main(["report", str(_grpo_run(tmp_path / "run")), "--out", str(tmp_path / "out")])
    msg = str(err.value.code)
    assert msg.startswith("rl-small report: error: ") and "\n" not in msg
    assert "pip install matplotlib" in msg and ".[report]" in msg
