"""Data-parallel helpers. Gradients are DDP's (Accelerate); tests/test_distributed.py checks that two gloo
processes train the same adapter as one process with the same global batch."""

from __future__ import annotations

from typing import Any

import torch


def reduce_metrics(acc: Any, metrics: dict[str, float]) -> dict[str, float]:
    """The mean of each metric over the processes that report it; unchanged with one. The keys can differ
    between processes (``reward/<name>`` is absent where that reward abstained for the whole batch, a reward's
    own metrics where it had nothing to report), so they are gathered first: same-length reductions."""
    if acc.num_processes == 1:
        return metrics
    keys = sorted({k for ks in gather_object(acc, [sorted(metrics)]) for k in ks})
    pairs = [(float(metrics.get(k, 0.0)), float(k in metrics)) for k in keys]
    sums = acc.reduce(torch.tensor(pairs, dtype=torch.float64, device=acc.device), reduction="sum").tolist()
    return {k: total / count for k, (total, count) in zip(keys, sums, strict=True) if count}


def gather_object(acc: Any, objects: list[Any]) -> list[Any]:
    """Every process's ``objects`` (picklable) concatenated in process order; unchanged with one process."""
    if acc.num_processes == 1:
        return list(objects)
    from accelerate.utils import gather_object as gather

    return gather(objects)


class World:
    """This process's view of the data-parallel group, for batch-level decisions that must agree across
    processes (dynamic sampling, the difficulty filter, domain weights, batch-wide normalisation). With one
    process (or no accelerator) every operation returns its input unchanged."""

    def __init__(self, acc: Any = None) -> None:
        self.acc = acc
        self.rank = acc.process_index if acc is not None else 0
        self.size = acc.num_processes if acc is not None else 1

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of ``values`` over the processes (a 1-D tensor, same shape on every process)."""
        if self.size == 1:
            return values
        # on the accelerator's device: NCCL reduces only CUDA tensors
        return self.acc.reduce(values.detach().to(self.acc.device, copy=True), reduction="sum").to(values.device)

    def gather(self, objects: list[Any]) -> list[Any]:
        """Every process's ``objects`` (picklable) concatenated in process order."""
        return gather_object(self.acc, objects) if self.size > 1 else list(objects)

    def mean_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` that no DDP wrapper reduces (the PPO critic's) in place."""
        if self.size == 1:
            return
        for p in params:  # the same layout on every process, even where a parameter got no gradient here
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads])) / self.size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
