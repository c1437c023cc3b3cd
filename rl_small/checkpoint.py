"""Atomic checkpoints: trainable weights (+ a PEFT adapter folder), optimizer, scheduler, step, RNG,
data cursor, reward state and extra component state (PPO critic, sampling statistics).

    save_checkpoint(run_dir, step, model, opt, sched, trainer_state, reward_state, extra={"critic": ...})
    state = load_checkpoint(list_checkpoints(run_dir)[-1], model, opt, sched)   # state["extra"]["critic"]

A checkpoint is written into a temporary folder and renamed into place, so a run killed mid-save leaves the
previous checkpoint intact and never a half-written one. Older checkpoints beyond ``keep`` are removed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step_"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    reward_state: dict[str, Any],
    keep: int = 2,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and prune old ones; returns its folder.

    ``trainable.pt`` holds the parameters that require grad (LoRA adapters, or every weight for full
    fine-tuning); ``extra`` (tensors allowed) goes into ``state.pt`` for components that own their state,
    e.g. the PPO critic's value head and optimizer.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(trainable, tmp / "trainable.pt")
    if hasattr(model, "peft_config"):
        model.save_pretrained(tmp / "adapter")
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
         "rewards": reward_state, "extra": extra or {}},
        tmp / "state.pt",
    )
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "trainer_state.json").exists())


def load_checkpoint(path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from ``path``; returns trainer_state (+ ``rewards``,
    ``extra``)."""
    trainable = torch.load(path / "trainable.pt", weights_only=True)
    params = dict(model.named_parameters())
    missing = [n for n in trainable if n not in params]
    if missing:
        raise KeyError(f"checkpoint {str(path)!r} has parameters the model lacks, e.g. {missing[:3]}")
    with torch.no_grad():
        for n, t in trainable.items():
            params[n].copy_(t)
    state = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    trainer_state["rewards"] = state.get("rewards", {})
    trainer_state["extra"] = state.get("extra", {})
    return trainer_state
