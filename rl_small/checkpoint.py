"""Atomic checkpoints: trainable weights (+ a PEFT adapter folder), optimizer, scheduler, step, RNG,
data cursor, reward state and extra component state (PPO critic, sampling statistics).

    save_checkpoint(run_dir, step, model, opt, sched, trainer_state, reward_state, extra={"critic": ...},
                    ranks=[{"rng": ..., "rewards": ...}, ...])             # one entry per data-parallel process
    state = load_checkpoint(list_checkpoints(run_dir)[-1], model, opt, sched, rank=1, world=2)

With several processes each rank samples from its own RNG stream and its rewards may keep their own state
(an episodic memory fills with that rank's rollouts), so rank 0 writes every rank's RNG and reward state and
each rank resumes its own. Resuming with a different number of processes falls back to rank 0's, with a
warning: the run continues, but not as the uninterrupted run would have.

A checkpoint is written into a temporary folder and renamed into place, so a run killed mid-save leaves the
previous checkpoint intact and never a half-written one; a save that fails (disk full) removes its temporary
folder, and ``clean_temporaries`` removes those of killed saves at the start of the next run. Older checkpoints
beyond ``keep`` are removed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch's CPU generators, and on a GPU machine every CUDA device's generator (sampling
    in the ``hf`` backend and dropout draw from the GPU's own generator there)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


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
    ranks: list[dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and prune old ones; returns its folder.

    ``trainable.pt`` holds the parameters that require grad (LoRA adapters, or every weight for full
    fine-tuning); ``extra`` (tensors allowed) goes into ``state.pt`` for components that own their state,
    e.g. the PPO critic's value head and optimizer; ``ranks`` holds each data-parallel process's ``rng`` and
    ``rewards`` state (index = process index).
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    try:
        trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(trainable, tmp / "trainable.pt")
        if hasattr(model, "peft_config"):
            model.save_pretrained(tmp / "adapter")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
             "rewards": reward_state, "extra": extra or {}, "ranks": ranks or []},
            tmp / "state.pt",
        )
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}))
    except BaseException:  # disk full, interrupted: leave no partial folder behind to fill the disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_temporaries(run_dir: Path) -> list[Path]:
    """Remove the temporary folders of saves that a killed process left behind; returns them. Only the run
    directory's lock holder calls this (rl_small.rundir), so no live save is removed."""
    root = run_dir / "checkpoints"
    stale = sorted(p for p in root.glob(f"{TMP_PREFIX}*") if p.is_dir()) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        log.info("removed %d unfinished checkpoint folder(s) in %s", len(stale), root)
    return stale


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "trainer_state.json").exists())


def load_checkpoint(
    path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0, world: int = 1
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG from ``path``; returns trainer_state (+ this
    rank's ``rewards``, ``extra``)."""
    trainable = torch.load(path / "trainable.pt", weights_only=True)
    params = dict(model.named_parameters())
    missing = [n for n in trainable if n not in params]
    if missing:
        from rl_small.config import RecipeError

        raise RecipeError(f"checkpoint {str(path)!r} has parameters the model lacks, e.g. {missing[:3]} (resumed "
                          "with other model.lora settings than the run that saved it?)")
    with torch.no_grad():
        for n, t in trainable.items():
            params[n].copy_(t)
    state = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ranks = state.get("ranks") or []
    own = ranks[rank] if len(ranks) == world else {"rng": state["rng"], "rewards": state.get("rewards", {})}
    if len(ranks) != world and (ranks or world > 1):  # a different process count (old checkpoints: no ranks)
        log.warning("checkpoint %s was written by %d process(es), resumed by %d: every rank takes rank 0's RNG "
                    "and reward state, so sampling will not continue as the uninterrupted run", path,
                    max(len(ranks), 1), world)
    set_rng_state(own["rng"])
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    trainer_state["rewards"] = own["rewards"]
    trainer_state["extra"] = state.get("extra", {})
    return trainer_state
