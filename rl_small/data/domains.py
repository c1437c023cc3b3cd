"""The training data of a run: the rows of ``data.task`` or of each task of ``data.mix``, and the prompt
mixture over them (rl_small.data.mixture) that the trainer draws from.

    domain_rows, stats = load_domains(cfg.data)     # before the model loads: a bad task or path fails first
    mixture = build_mixture(cfg, domain_rows, tok)   # prompts rendered with the tokenizer's chat template
"""

from __future__ import annotations

from typing import Any

from rl_small.config import DataConfig, RecipeError, RunConfig
from rl_small.data.mixture import DomainMixture, DynamicWeights
from rl_small.data.registry import LoadStats, build_prompts, load_task_rows
from rl_small.types import Prompt

DomainRows = dict[str, tuple[DataConfig, list[dict[str, Any]]]]


def load_domains(d: DataConfig) -> tuple[DomainRows, LoadStats]:
    """Rows of data.task, or of each task of data.mix (its own config, by domain name); load counts summed."""
    subs = [(m.name or m.task, d.model_copy(update={"task": m.task, "path": m.path, "mix": [],
                                                      "difficulty": m.difficulty or d.difficulty}))
            for m in d.mix] or [(d.task, d)]
    out, total = {}, LoadStats()
    for name, sub in subs:
        try:
            rows, stats = load_task_rows(sub, sub.split)
        except KeyError as err:  # unknown task: a config error, not a crash
            raise RecipeError(f"data{'.mix' if d.mix else ''}: {err.args[0]}") from err
        total.kept += stats.kept
        total.skipped += stats.skipped
        out[name] = (sub, rows)
    return out, total


def build_mixture(cfg: RunConfig, domain_rows: DomainRows, tok: Any) -> DomainMixture:
    """Prompts per domain, each tagged with its domain, and the sampler over them."""
    a, d = cfg.sampling, cfg.data
    domains: dict[str, list[Prompt]] = {}
    for name, (sub, rows) in domain_rows.items():
        domains[name] = build_prompts(rows, tok, sub)
        for p in domains[name]:
            p.columns["domain"] = name
    dynamic = DynamicWeights(a.domain_target, a.domain_tau, a.domain_ewma) if a.domain_sampling else None
    return DomainMixture(domains, {(m.name or m.task): m.weight for m in d.mix}, d.seed, dynamic)
