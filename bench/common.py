"""Shared pieces of the benchmarks: spread statistics, the machine description, result files, worker runs.

    from common import spread, machine, save_results, run_worker
    spread([1.0, 2.0, 4.0])        # {"n": 3, "mean": 2.33, "min": 1.0, "max": 4.0, "std": 1.53}
    save_results("trl_compare", payload)   # bench/results/trl_compare.json, with the machine and the command

Every timing benchmark repeats its measurement (>= 3 by default) and reports the spread, because this 2-core
machine is noisy; comparisons are ratios of runs made in the same invocation, interleaved.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """Where the benchmarks read real data: ``$RL_SMALL_DATA``, else the checkout's ``data/`` (written by
    ``rl-small data download --out data``), else a ``shared/data`` folder next to the checkout or next to the
    folder of git worktrees that holds it; ``data/`` when none exists (the parts that need it are skipped)."""
    if os.environ.get("RL_SMALL_DATA"):
        return Path(os.environ["RL_SMALL_DATA"])
    here = ROOT / "data"
    side = [p / "shared" / "data" for p in (ROOT.parent, ROOT.parent.parent)]
    return next((p for p in (here, *side) if p.is_dir()), here)


def spread(values: list[float]) -> dict[str, float]:
    """n, mean, min, max and sample standard deviation (0 for one value) of ``values``."""
    if not values:
        raise ValueError("spread() of no values")
    return {"n": len(values), "mean": statistics.mean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def fmt(s: dict[str, float], digits: int = 1) -> str:
    """``mean [min-max]`` of a spread()."""
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def save_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` with the machine, the command line and the date added."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    full = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": machine(), **payload}
    out.write_text(json.dumps(full, indent=2))
    return out


def run_worker(python: str, script: Path, args: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``python script --worker ... --out out`` in a fresh process (a fresh interpreter per measured run,
    so no run inherits another's caches or threads) and return the JSON it wrote; its failure names the
    command and ends with its output tail."""
    cmd = [python, str(script), *args, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(script.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"worker failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return json.loads(out.read_text())


def noisy_lora_policy(model_dir: str, out: Path | None = None) -> Any:
    """The model in fp32 with a non-trivial r=16 all-linear LoRA adapter (B filled with small noise, seed 0),
    in eval mode; saved to ``out`` when given."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    if out is not None:
        model.save_pretrained(out)
    return model.eval()
