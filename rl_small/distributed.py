"""Data-parallel helpers. Gradients are DDP's (Accelerate); tests/test_distributed.py checks that two gloo
processes train the same adapter as one process with the same global batch."""

from __future__ import annotations

from typing import Any

import torch


def reduce_metrics(acc: Any, metrics: dict[str, float]) -> dict[str, float]:
    """The mean of each metric over the processes (every rank logs the same keys); unchanged with one."""
    if acc.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    values = acc.reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64), reduction="mean")
    return dict(zip(keys, values.tolist(), strict=True))


def gather_object(acc: Any, objects: list[Any]) -> list[Any]:
    """Every process's ``objects`` (picklable) concatenated in process order; unchanged with one process."""
    if acc.num_processes == 1:
        return list(objects)
    from accelerate.utils import gather_object as gather

    return gather(objects)
