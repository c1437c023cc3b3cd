"""Which training prompt comes next: seeded per-epoch permutations of one or several tasks (domains).

    mix = DomainMixture({"arith": prompts}, {"arith": 1.0}, seed=0)
    batch = mix.draw(4)                          # the next 4 prompts; the cursors advance (checkpointed)
    mix.observe(["arith", ...], [0.5, ...])      # RuleReasoner: per-domain rewards update the weights

With one domain this is a plain walk through a shuffled epoch. With several (``data.mix``), each prompt slot
picks a domain by weight (seeded by the draw count, so a resumed run draws the same) and takes that domain's
next prompt. The weights are the recipe's, or — with ``sampling.domain_sampling`` — RuleReasoner's domain-aware
dynamic sampling (arXiv 2506.08672): w = softmax(max(0, target - rbar_d) / tau) over an EWMA rbar_d of each
domain's mean reward, so domains the policy is worse at are drawn more often.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rl_small.sampling import domain_weights, ewma
from rl_small.types import Prompt


@dataclass(frozen=True)
class DynamicWeights:
    """RuleReasoner parameters: target reward, softmax temperature, EWMA factor of the domain means."""

    target: float = 1.0
    tau: float = 0.8
    alpha: float = 0.5


class DomainMixture:
    """Per-domain cursors over seeded permutations and the domain weights; ``state_dict`` for checkpoints."""

    def __init__(
        self, domains: dict[str, list[Prompt]], weights: dict[str, float], seed: int,
        dynamic: DynamicWeights | None = None,
    ) -> None:
        empty = [d for d, p in domains.items() if not p]
        if empty:
            raise ValueError(f"data.mix: domain(s) {empty} have no prompts")
        self.names = list(domains)
        self.prompts = domains
        self.seed, self.dynamic = seed, dynamic
        base = torch.tensor([float(weights.get(d, 1.0)) for d in self.names])
        self.base = base / base.sum()
        self.cursor: dict[str, dict[str, int]] = {d: {"epoch": 0, "index": 0} for d in self.names}
        self.draws = 0
        self.mean_reward: torch.Tensor | None = None  # (D,) EWMA of per-domain mean reward
        self._orders: dict[tuple[str, int], list[int]] = {}

    def weights(self) -> torch.Tensor:
        """(D,) current sampling weights: the recipe's, or RuleReasoner's once rewards were observed."""
        if self.dynamic is None or self.mean_reward is None:
            return self.base
        return domain_weights(self.mean_reward, self.dynamic.target, self.dynamic.tau)

    def _order(self, domain: str, epoch: int) -> list[int]:
        key = (domain, epoch)
        if key not in self._orders:
            # one domain: the same permutation as a single-task run has always used
            tag = f"{self.seed}/{epoch}" if len(self.names) == 1 else f"{self.seed}/{domain}/{epoch}"
            order = list(range(len(self.prompts[domain])))
            random.Random(tag).shuffle(order)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != domain} | {key: order}
        return self._orders[key]

    def _next(self, domain: str) -> Prompt:
        cur = self.cursor[domain]
        order = self._order(domain, cur["epoch"])
        prompt = self.prompts[domain][order[cur["index"]]]
        cur["index"] += 1
        if cur["index"] >= len(order):
            self.cursor[domain] = {"epoch": cur["epoch"] + 1, "index": 0}
        return prompt

    def draw(self, n: int, skip: Callable[[Prompt], bool] | None = None) -> tuple[list[Prompt], int]:
        """The next ``n`` prompts and how many were passed over by ``skip`` (e.g. the difficulty filter)."""
        out: list[Prompt] = []
        skipped = run = 0
        total = sum(len(p) for p in self.prompts.values())
        w = self.weights().tolist()
        while len(out) < n:
            if len(self.names) == 1:
                domain = self.names[0]
            else:
                domain = random.Random(f"{self.seed}/mix/{self.draws}").choices(self.names, weights=w)[0]
            self.draws += 1
            prompt = self._next(domain)
            if skip is not None and skip(prompt):
                skipped += 1
                run += 1
                if run >= total:
                    raise RuntimeError(f"difficulty_filter: all {total} training prompts have a pass rate of 0 or 1")
                continue
            run = 0
            out.append(prompt)
        return out, skipped

    def observe(self, domains: list[str], rewards: list[float]) -> dict[str, float]:
        """Fold this batch's per-domain mean rewards into the EWMA; metrics of the weights now in force."""
        if self.dynamic is None:
            return {}
        sums, counts = torch.zeros(len(self.names)), torch.zeros(len(self.names))
        for d, r in zip(domains, rewards):
            i = self.names.index(d)
            sums[i] += r
            counts[i] += 1
        seen = counts > 0
        batch = torch.where(seen, sums / counts.clamp(min=1), torch.zeros_like(sums))
        if self.mean_reward is None:  # a domain not seen yet counts as reward 0 (draws it: explore)
            self.mean_reward = batch
        else:  # a domain absent from this batch keeps its estimate
            self.mean_reward = torch.where(seen, ewma(self.mean_reward, batch, self.dynamic.alpha), self.mean_reward)
        w = self.weights()
        out = {f"sampling/domain_weight/{d}": float(w[i]) for i, d in enumerate(self.names)}
        return out | {f"sampling/domain_reward/{d}": float(self.mean_reward[i]) for i, d in enumerate(self.names)}

    def state_dict(self) -> dict[str, Any]:
        mean = None if self.mean_reward is None else self.mean_reward.tolist()
        return {"cursor": {d: dict(c) for d, c in self.cursor.items()}, "draws": self.draws, "mean_reward": mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.names) - set(state["cursor"])
        if missing:
            raise KeyError(f"checkpoint has no cursor for domain(s) {sorted(missing)} (was data.mix changed?)")
        self.cursor = {d: dict(state["cursor"][d]) for d in self.names}
        self.draws = state["draws"]
        self.mean_reward = None if state["mean_reward"] is None else torch.tensor(state["mean_reward"])
