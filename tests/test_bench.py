"""``rl-small bench`` (listing, running, errors) and the benchmarks' arithmetic on hand-made runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from rl_small.cli import BENCH_DIR, benchmarks, main, run_bench

sys.path.insert(0, str(BENCH_DIR))
import common
import scaling
import seed_study
import trl_compare


def test_listing_names_every_benchmark_with_its_summary(capsys: pytest.CaptureFixture[str]) -> None:
    known = benchmarks()
    assert {"trl_compare", "scaling", "rollout_speed", "reward_speed", "step_time"} <= set(known)
    assert "common" not in known
    assert known["scaling"].startswith("Benchmark: how a training step's cost grows")
    with pytest.raises(SystemExit) as exc:
        main(["bench"])
    assert exc.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(known) and any(line.startswith("trl_compare ") for line in lines)


def test_runs_the_script_with_its_arguments_and_exit_code(tmp_path: Path) -> None:
    folder = tmp_path / "bench"
    folder.mkdir()
    out = tmp_path / "argv.txt"
    (folder / "echo.py").write_text(f'"""Echo."""\nimport sys\nopen({str(out)!r}, "w").write(" ".join(sys.argv[1:]))\n'
                                    "sys.exit(3)\n")
    assert run_bench("echo", ["--reps", "2", "x=1"], folder) == 3
    assert out.read_text() == "--reps 2 x=1"


def test_unknown_benchmark_and_missing_folder_are_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "trl_compar"])
    assert "unknown benchmark 'trl_compar'" in str(exc.value.code) and "trl_compare" in str(exc.value.code)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        run_bench(None, [], tmp_path / "nowhere")


def test_spread() -> None:
    s = common.spread([1.0, 2.0, 6.0])
    assert (s["n"], s["mean"], s["min"], s["max"]) == (3, 3.0, 1.0, 6.0)
    assert s["std"] == pytest.approx(2.6457513, rel=1e-6)  # sqrt(((2)^2 + 1 + 3^2) / 2) = sqrt(7)
    assert common.spread([4.0])["std"] == 0.0
    assert common.fmt(s) == "3.0 [1.0-6.0]"
    with pytest.raises(ValueError):
        common.spread([])


def _rep(steps: list[float], rewards: list[float]) -> dict[str, list[dict[str, float]]]:
    return {"steps": [{"step": s, "rollout": s / 2, "reward": 0.1, "update": s / 2 - 0.1, "reward_mean": r,
                       "len_mean": 10.0} for s, r in zip(steps, rewards)]}


def test_trl_compare_summary_drops_the_warmup_and_pairs_repetitions() -> None:
    runs = {"trl": [_rep([50.0, 10.0, 10.0], [0.0, 0.1, 0.2]), _rep([50.0, 20.0, 20.0], [0.0, 0.3, 0.4])],
            "hf": [_rep([9.0, 5.0, 5.0], [0.0, 0.2, 0.2]), _rep([9.0, 4.0, 6.0], [0.0, 0.2, 0.6])]}
    s = trl_compare.summarize(runs)
    assert s["trl"]["stages_s"]["step"]["mean"] == 15.0  # the 50 s warm-up steps are not timed
    assert s["hf"]["stages_s"]["step"]["max"] == 6.0
    # per repetition: 5/10 and 5/20 (rep 2's mean of 4 and 6 is 5) -> ratios 0.5 and 0.25
    assert s["hf"]["step_vs_trl"]["min"] == 0.25 and s["hf"]["step_vs_trl"]["max"] == 0.5
    assert s["trl"]["step_vs_trl"]["mean"] == 1.0
    assert s["hf"]["reward_per_step"] == pytest.approx([0.0, 0.2, 0.4])
    assert s["trl"]["reward_last_step"]["mean"] == pytest.approx(0.3)
    assert s["hf"]["reward_share_of_step"]["max"] == pytest.approx(0.1 / 4.0)


def test_scaling_summary_ratios_within_each_sweep() -> None:
    def run(sweep: str, g: int, length: int, steps: list[float], tokens: float) -> dict[str, Any]:
        return {"sweep": sweep, "G": g, "L": length, "steps": [
            {"step": s, "rollout": s / 2, "reward": s / 10, "prepare": 0.0, "update": s * 0.4, "tokens": tokens,
             "reward/math_accuracy": s / 10} for s in steps]}

    rows = scaling.summarize([run("group", 4, 128, [10.0, 10.0], 1024), run("group", 8, 128, [18.0, 22.0], 2048),
                              run("length", 8, 128, [20.0, 20.0], 2048), run("length", 8, 512, [70.0, 90.0], 8192)])
    assert [r["step_vs_first_of_sweep"] for r in rows] == pytest.approx([1.0, 2.0, 1.0, 4.0])
    assert rows[3]["rollout_ms_per_token"]["mean"] == pytest.approx(1000 * (35 / 8192 + 45 / 8192) / 2)
    assert rows[1]["reward_share"]["mean"] == pytest.approx(0.1)
    assert rows[1]["reward_components_s"] == {"math_accuracy": pytest.approx(2.0)}


def test_scaling_configs_cover_both_sweeps() -> None:
    args = type("A", (), {"groups": [4, 8, 16], "lengths": [128, 256, 512], "base_group": 8, "base_length": 128,
                          "prompts": 2, "no_memory": False, "overrides": []})()
    cfgs = scaling.configs(args)
    assert [(c["sweep"], c["G"], c["L"]) for c in cfgs] == [
        ("group", 4, 128), ("group", 8, 128), ("group", 16, 128), ("length", 8, 128), ("length", 8, 256),
        ("length", 8, 512), ("memory_r_plus", 8, 48)]
    assert all("rollout.ignore_eos=true" in c["args"] for c in cfgs[:6])


def test_trl_gpu_head_stand_in_equals_trls_chunked_logprob() -> None:
    """The trl_gpu_head system replaces TRL's chunked LM-head kernel with dense maths: same values and
    gradients as TRL's own CPU implementation."""
    import torch

    kernels = pytest.importorskip("trl.kernels")
    torch.manual_seed(0)
    hidden = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (12,))
    outs = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    ref = kernels.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 0.7, 8, None, 1.0, outs)
    ours = trl_compare.DenseLogProb.apply(hidden, weight, None, targets, 0.7, 8, None, 1.0, outs)
    for a, b in zip(ref, ours, strict=True):
        assert torch.allclose(a.double(), b.double(), atol=1e-5)  # TRL accumulates in fp32
    g_ref = torch.autograd.grad((ref[0] * torch.arange(12.0)).sum() + ref[1].sum(), hidden)[0]
    g_ours = torch.autograd.grad((ours[0] * torch.arange(12.0)).sum() + ours[1].sum(), hidden)[0]
    assert torch.allclose(g_ref.double(), g_ours.double(), atol=1e-5)


def test_eval_compare_pairs_the_problems_both_evaluations_have(tmp_path: Path) -> None:
    import json

    from eval_compare import compare, load

    def write(folder: Path, correct: list[bool], boxed: list[bool], problems: int) -> Path:
        (folder / "eval").mkdir(parents=True)
        rows = [{"id": f"p{i}", "sample": 0, "correct": c, "completion": "\\boxed{1}" if b else "so 1",
                 "tokens": 10 * (i + 1), "truncated": i == 0} for i, (c, b) in enumerate(zip(correct, boxed))]
        (folder / "eval" / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "eval" / "summary.json").write_text(json.dumps({"benchmarks": {"gsm8k": {"problems": problems}}}))
        return folder

    a = load(write(tmp_path / "a", [True, False, True, False], [False, False, True, False], 4))
    b = load(write(tmp_path / "b", [False, True], [False, True], 4))  # cut short after 2 of 4 problems
    row = compare(a, b)["gsm8k"]
    assert row["a"]["accuracy"] == 0.5 and row["a"]["correct_boxed"] == 1 and row["a"]["complete"]
    assert row["b"]["problems"] == 2 and not row["b"]["complete"] and row["b"]["len_mean"] == 15
    assert (row["paired_problems"], row["paired_a"], row["paired_b"], row["only_a"], row["only_b"]) == (2, 0.5, 0.5, 1, 1)
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        load(tmp_path)


def _summary(seed: int, before: float, after: float, up: int, down: int, n: int = 200) -> dict[str, Any]:
    return {"seed": seed, "before": {"accuracy": before, "n": n}, "after": {"accuracy": after, "n": n},
            "paired": {"problems": n, "after_only": up, "before_only": down}, "finished": True}


def test_seed_study_gain_interval_and_paired_difference() -> None:
    # gain +0.10 with 30 problems gained, 10 lost of 200: se = sqrt(40 - 20^2/200) / 200 = sqrt(38) / 200
    r = seed_study.run_gain(_summary(0, 0.20, 0.30, up=30, down=10))
    assert r["gain"] == pytest.approx(0.10) and r["gain_se"] == pytest.approx(38**0.5 / 200)
    grpo = [seed_study.run_gain(_summary(s, 0.2, a, 10, 5)) for s, a in enumerate([0.35, 0.50, 0.10])]
    mem = [seed_study.run_gain(_summary(s, 0.2, a, 10, 5)) for s, a in enumerate([0.29, 0.23, 0.20])]
    out = seed_study.summarize({"grpo": grpo, "mem": mem})
    g = out["methods"]["grpo"]["gain"]
    assert (g["n"], g["mean"], g["min"]) == (3, pytest.approx(0.11666667), pytest.approx(-0.10))
    # sd of (0.15, 0.30, -0.10) = 0.2021; half-width 4.303 x sd / sqrt(3) (t with 2 degrees of freedom)
    assert g["hi"] - g["mean"] == pytest.approx(4.303 * 0.20207259 / 3**0.5, rel=1e-5)
    assert out["methods"]["grpo"]["below_base"] == 1 and out["methods"]["mem"]["below_base"] == 0
    assert out["paired"]["per_seed"] == pytest.approx([-0.06, -0.27, 0.10])
    assert seed_study.t975(4) == 2.776 and seed_study.t975(11) == 2.228 and seed_study.t975(40) == 1.96
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_study.t975(0)


def test_seed_study_reuses_finished_runs_and_resumes_interrupted_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    calls: list[list[str]] = []

    def fake_run(cmd: list[str], cwd: Any, check: bool) -> None:
        calls.append(cmd)
        name = cmd[cmd.index("--resume") + 1] if "--resume" in cmd else str(
            tmp_path / next(a for a in cmd if a.startswith("train.run_name=")).split("=")[1])
        Path(name).mkdir(parents=True, exist_ok=True)
        (Path(name) / "summary.json").write_text(json.dumps(_summary(0, 0.2, 0.25, 12, 2)))

    monkeypatch.setattr(seed_study.subprocess, "run", fake_run)
    done = tmp_path / "grpo_arith_s0"
    done.mkdir()
    (done / "summary.json").write_text(json.dumps(_summary(0, 0.2, 0.4, 50, 10)))
    assert seed_study.train("recipes/smollm2-135m/grpo/arith.yaml", 0, tmp_path, [], "py")["after"]["accuracy"] == 0.4
    assert calls == []  # finished: read, not redone
    (tmp_path / "grpo_arith_s1" / "checkpoints").mkdir(parents=True)
    seed_study.train("recipes/smollm2-135m/grpo/arith.yaml", 1, tmp_path, ["data.difficulty=3"], "py")
    assert calls[-1] == ["py", "-m", "rl_small.train", "--resume", str(tmp_path / "grpo_arith_s1")]
    seed_study.train(None, 2, tmp_path, ["data.difficulty=3"], "py")
    assert calls[-1][3:] == ["train.seed=2", "data.seed=2", f"train.output_dir={tmp_path}",
                             "train.run_name=default_s2", "train.progress=false", "data.difficulty=3"]


def test_seed_study_dynamics_compare_first_and_last_steps(tmp_path: Path) -> None:
    import json

    rows = [{"step": 0, "eval/accuracy": 0.1}]  # an evaluation row: not a training step
    for step in range(1, 13):  # steps 1-5 truncated 1.0, 8-12 truncated 0.0; accuracy = step / 100
        rows.append({"step": step, "loss/total": 0.1, "reward/math_accuracy": step / 100, "rollout/len_mean": 48.0,
                     "rollout/truncated_frac": 1.0 if step <= 6 else 0.0, "rollout/zero_adv_groups": 0.5})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    d = seed_study.dynamics(tmp_path / "metrics.jsonl")
    assert d["train_acc"] == pytest.approx([0.03, 0.10]) and d["truncated"] == [1.0, 0.0]
    assert d["len"] == [48.0, 48.0] and d["zero_adv"] == [0.5, 0.5]
    r = seed_study.run_gain(_summary(3, 0.2, 0.3, 30, 10), tmp_path)
    text = seed_study.table(seed_study.summarize({"grpo": [r]}), {"grpo": [r]})
    assert "| grpo | 3 | 20.0% | 30.0% (200) | +10.0 ± 3.1 | 0.030 → 0.100 | 1.00 → 0.00 | 48.0 → 48.0 | 0.50 → 0.50 |" in text
    assert "dynamics" not in seed_study.run_gain(_summary(3, 0.2, 0.3, 30, 10), tmp_path / "missing")
