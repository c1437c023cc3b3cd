"""``rl-small report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page (PNGs embedded) plus the PNGs.

    rl-small report runs/a runs/b --out runs/report

Curves (from each run's metrics.jsonl): reward, training accuracy, completion length, truncated share, KL,
policy entropy, PPO clip fraction and any ``eval/<bench>/pass@1``; a run's KL / entropy / clip-fraction line is
left out when it is all zero (the feature was off), a chart without lines is not drawn; tables: held-out before/after (summary.json) and benchmark results
(eval/summary.json). Several runs are drawn on the same axes to compare them. Needs matplotlib (``pip install -e '.[report]'``).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from rl_small import metric_names as M

# (metric keys, the first a run has is drawn; title; drop a run's series when it is all zero: the feature is off)
CURVES: list[tuple[tuple[str, ...], str, bool]] = [
    ((M.REWARD_TOTAL,), "total reward", False),
    ((M.REWARD_ACCURACY,), "training accuracy (math_accuracy)", False),
    ((M.ROLLOUT_LEN_MEAN,), "completion length (tokens)", False),
    ((M.ROLLOUT_TRUNCATED_FRAC, M.OLD_TRUNCATED_FRAC), "truncated completions (share at max_new_tokens)", False),
    ((M.POLICY_KL, M.LOSS_KL), "KL to reference", True),  # 0 when KL is neither in the loss nor logged
    ((M.POLICY_ENTROPY, M.OLD_ENTROPY), "policy entropy", True),
    ((M.LOSS_CLIP_FRAC,), "PPO ratio clip fraction", True),  # 0 in on-policy GRPO (one epoch, one minibatch)
]
MATPLOTLIB_HINT = "rl-small report needs matplotlib: pip install matplotlib (or pip install -e '.[report]')"


def read_metrics(run: Path) -> list[dict[str, float]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{str(run)!r} has no metrics.jsonl (not a run directory?)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
            continue
    return rows


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def series(metrics: dict[Path, list[dict[str, float]]], keys: tuple[str, ...], drop_zero: bool
           ) -> dict[str, list[tuple[int, float]]]:
    """Run name -> (step, value) points of the first of ``keys`` the run logged; runs without points, and with
    ``drop_zero`` runs whose values are all 0 (the feature was off), are left out."""
    out = {}
    for run, rows in metrics.items():
        key = next((k for k in keys if any(k in m for m in rows)), None)
        pts = [(int(m["step"]), float(m[key])) for m in rows if key is not None and key in m and "step" in m]
        if pts and not (drop_zero and all(v == 0 for _, v in pts)):
            out[run.name] = pts
    return out


def _chart(plt: Any, title: str, lines: dict[str, list[tuple[int, float]]]) -> Any:
    """One figure: a line per run, integer steps on the x axis."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, pts in lines.items():
        ax.plot(*zip(*pts), marker="." if len(pts) < 40 else None, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def make_report(runs: list[Path], out: Path) -> Path:
    """Write ``out/report.html`` and ``out/<curve>.png``; returns the HTML path."""
    try:
        import matplotlib
    except ImportError:
        raise ModuleNotFoundError(MATPLOTLIB_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {r: read_metrics(r) for r in runs}
    evals = sorted({k for rows in metrics.values() for m in rows for k in m if k.startswith("eval/")})
    charts = [(keys[0], title, series(metrics, keys, drop)) for keys, title, drop in CURVES]
    charts += [(k, k, series(metrics, (k,), False)) for k in evals]
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>rl-small report</h1><p>runs: {', '.join(html.escape(str(r)) for r in runs)}</p>"]
    parts.append(_summary_table(runs))
    for key, title, lines in charts:
        if not lines:
            continue
        fig = _chart(plt, title, lines)
        png = _png(fig)
        plt.close(fig)
        (out / (key.replace("/", "_") + ".png")).write_bytes(png)
        parts.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    page = out / "report.html"
    style = "body{font-family:sans-serif;max-width:1300px}img{margin:4px}td,th{padding:2px 8px;text-align:right}"
    page.write_text(f"<!doctype html><meta charset='utf-8'><title>rl-small report</title><style>{style}</style>"
                    + "\n".join(parts))
    return page


def _summary_table(runs: list[Path]) -> str:
    rows = ["<table><tr><th>run</th><th>held-out before</th><th>after</th><th>change</th><th>n</th>"
            "<th>benchmarks (pass@1)</th></tr>"]
    for run in runs:
        s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
        before, after = s.get("before", {}).get("accuracy"), s.get("after", {}).get("accuracy")
        change = f"{100 * (after - before):+.1f}" if before is not None and after is not None else ""
        ev_path = run / "eval" / "summary.json"
        bench = json.loads(ev_path.read_text()).get("benchmarks", {}) if ev_path.exists() else {}
        bench_txt = ", ".join(f"{k} {100 * v['pass@1']:.1f}%" for k, v in bench.items())
        n = s.get("after", s.get("before", {})).get("n", "")
        rows.append(f"<tr><td>{html.escape(run.name)}</td><td>{_pct(before)}</td><td>{_pct(after)}</td>"
                    f"<td>{change}</td><td>{n}</td><td>{html.escape(bench_txt)}</td></tr>")
    return "\n".join(rows) + "</table>"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"
