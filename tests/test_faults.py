"""Fault injection: poison (non-finite gradients), kill (-9 mid-run, then --resume), hang (a reward past its
timeout), interrupt (SIGINT), and two runs on one directory. Each asserts that nothing is lost or corrupted."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rl_small.config import load_recipe
from rl_small.guards import NonFiniteError, NonFiniteGuard
from rl_small.trainer import Trainer
from tests.helpers import ThreadWorld, free_port

TOKEN_REWARD = "rewards=[{name: 'tests.helpers:token_reward'}]"
FAKE = ["rollout.backend=fake", "rollout.fake_completions=['1', '22', '3 4', '5 6 7']"]


def _trainer(overrides: list[str], run_dir: Path, resume: bool = False) -> Trainer:
    return Trainer(load_recipe(None, overrides), run_dir, resume=resume)


def _params(tr: Trainer) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in tr.acc.unwrap_model(tr.model).named_parameters() if p.requires_grad}
    if tr.critic is not None:
        out |= {f"head.{n}": p.detach().clone() for n, p in tr.critic.head.named_parameters()}
    return out


def _poison(param: torch.nn.Parameter, steps: set[int], tr: Trainer) -> None:
    """Make the gradient of ``param`` NaN during the training steps ``steps`` (0-based step_no)."""
    param.register_hook(lambda g: g * float("nan") if tr.step_no in steps else g)


# ---- poison -------------------------------------------------------------------------------------------------
def test_nonfinite_gradient_skips_the_step_and_counts_it(tiny_overrides: list[str], tmp_path: Path) -> None:
    tr = _trainer(tiny_overrides + [TOKEN_REWARD, *FAKE, "train.steps=3"], tmp_path / "run")
    lora = next(p for n, p in tr.model.named_parameters() if "lora_A" in n)
    _poison(lora, {0}, tr)
    before = _params(tr)
    sched = tr.scheduler.state_dict()["last_epoch"]
    m = tr.step()
    assert m["optim/skipped_steps"] == 1.0 and math.isnan(m["optim/grad_norm"])
    assert tr.scheduler.state_dict()["last_epoch"] == sched, "the LR schedule advanced over a skipped step"
    after = _params(tr)
    assert all(torch.equal(before[n], after[n]) for n in before), "a skipped step changed a parameter"
    assert all(p.grad is None for p in tr.policy_params), "the poisoned gradients were kept"
    m2 = tr.step()  # the next, healthy step trains and resets the count
    assert m2["optim/skipped_steps"] == 0.0 and math.isfinite(m2["optim/grad_norm"])
    assert any(not torch.equal(before[n], p) for n, p in _params(tr).items())
    assert tr.nonfinite_guard.in_row == 0


def test_nonfinite_critic_gradient_skips_policy_and_critic(tiny_overrides: list[str], tmp_path: Path) -> None:
    tr = _trainer(tiny_overrides + [TOKEN_REWARD, *FAKE, "algo.name=ppo"], tmp_path / "run")
    assert tr.critic is not None
    _poison(next(tr.critic.head.parameters()), {0}, tr)
    before = _params(tr)
    m = tr.step()
    assert m["optim/skipped_steps"] == 1.0 and math.isnan(m["critic/grad_norm"])
    after = _params(tr)
    assert all(torch.equal(before[n], after[n]) for n in before), "policy or critic moved on a skipped step"


def test_k_nonfinite_steps_in_a_row_stop_the_run_naming_step_and_metric(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    tr = _trainer(tiny_overrides + [TOKEN_REWARD, *FAKE, "train.steps=5", "train.max_nonfinite_steps=2"],
                  tmp_path / "run")
    lora = next(p for n, p in tr.model.named_parameters() if "lora_A" in n)
    _poison(lora, {1, 2, 3}, tr)  # step 1 trains; steps 2 and 3 are poisoned
    with pytest.raises(NonFiniteError, match=r"step 3: 2 optimizer steps in a row .*optim/grad_norm=nan"):
        tr.fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"optim/skipped_steps": 1.0' in lines[1]


class NanOnceReward:
    """Scores like token_reward, but its first batch has a NaN (a reward that breaks once)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, completions: list[str], completion_ids: list[list[int]], **kwargs: object) -> list[float]:
        from tests.helpers import token_reward

        self.calls += 1
        scores = token_reward(completions, completion_ids)
        return [float("nan"), *scores[1:]] if self.calls == 1 else scores


def test_a_nan_reward_never_reaches_the_weights(tiny_overrides: list[str], tmp_path: Path) -> None:
    # Before: loss nan, the step applied, and step 2 died sampling from NaN weights. Now the NaN either abstains
    # (rewards) or the step is skipped (guards); either way the run goes on with finite weights.
    # (rloo: a NaN in a group spreads to its loss; grpo would give the group zero advantage)
    tr = _trainer(tiny_overrides + ["rewards=[{name: 'tests.test_faults:NanOnceReward'}]", "train.steps=3",
                                    "algo.name=rloo"], tmp_path / "run")
    tr.fit()
    assert tr.step_no == 3
    assert all(torch.isfinite(p).all() for p in _params(tr).values())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss/total"]) for r in rows[1:])


def test_every_process_skips_when_one_goes_nonfinite() -> None:
    worlds = ThreadWorld.group(2)

    def one(world: ThreadWorld) -> tuple[bool, dict[str, float]]:
        guard = NonFiniteGuard(3, world)
        stats: dict[str, float] = {"loss/total": float("nan") if world.rank == 1 else 0.5}
        return guard.skip(0, stats, {"optim/grad_norm": 1.0}), stats

    (skip0, stats0), (skip1, stats1) = ThreadWorld.run(worlds, one)
    assert skip0 and skip1
    assert stats0["optim/skipped_steps"] == stats1["optim/skipped_steps"] == 1.0


def test_a_loss_already_bad_earlier_in_the_step_does_not_skip_later_minibatches() -> None:
    guard = NonFiniteGuard(3, ThreadWorld.group(1)[0])
    stats = {"loss/total": float("nan")}
    assert guard.skip(0, stats, {"optim/grad_norm": 1.0})
    assert not guard.skip(0, stats, {"optim/grad_norm": 1.0}), "the same step's next minibatch was healthy"
    assert guard.skip(1, {"loss/total": float("inf")}, {"optim/grad_norm": 1.0}), "a new step is checked afresh"


# ---- processes: kill -9, Ctrl-C, two writers -----------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def _train_proc(overrides: list[str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "rl_small.cli", "train", *extra, *overrides], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train(overrides: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rl_small.cli", "train", *extra, *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    """Wait until ``path`` (metrics.jsonl) has ``n`` lines while ``proc`` still runs."""
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {n} lines in {path} after {timeout}s")


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _run_overrides(tiny_overrides: list[str], name: str, *more: str) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith("train.run_name")] + [f"train.run_name={name}", *more]


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_equals_the_uninterrupted_run(tiny_overrides: list[str], tmp_path: Path) -> None:
    common = [TOKEN_REWARD, "train.save_every=1", "train.steps=5"]
    full = _train_proc(_run_overrides(tiny_overrides, "full", *common))
    cut = _train_proc(_run_overrides(tiny_overrides, "cut", *common))
    _wait_for_lines(tmp_path / "cut" / "metrics.jsonl", 2, cut)
    os.kill(cut.pid, signal.SIGKILL)  # mid-step 3 (or mid-save)
    cut.wait()
    assert full.wait(timeout=600) == 0, full.stderr.read()[-2000:]  # type: ignore[union-attr]
    resumed = _train(["train.steps=5"], "--resume", str(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _steps(tmp_path / "cut") == [1, 2, 3, 4, 5], "metrics.jsonl lost or repeated steps"
    assert not list((tmp_path / "cut" / "checkpoints").glob(".tmp-*")), "a killed save's folder was left"
    a = torch.load(tmp_path / "full/checkpoints/step_000005/trainable.pt")
    b = torch.load(tmp_path / "cut/checkpoints/step_000005/trainable.pt")
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6, msg=f"{n} differs after kill -9 + resume")
    rows = {json.loads(line)["step"]: json.loads(line) for line in (tmp_path / "full/metrics.jsonl").open()}
    for line in (tmp_path / "cut/metrics.jsonl").open():
        row = json.loads(line)
        assert row["reward/total"] == pytest.approx(rows[row["step"]]["reward/total"], abs=1e-9)


def _interrupt(tiny_overrides: list[str], run: Path) -> int:
    """Start a long run, Ctrl-C it after its first step; check the clean stop; the step it stopped at."""
    proc = _train_proc([*tiny_overrides, TOKEN_REWARD, *FAKE, "train.steps=400", "train.save_every=0"])
    _wait_for_lines(run / "metrics.jsonl", 1, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in out + err
    n = len(_steps(run))
    assert f"rl-small: stopped at step {n}; resume with: rl-small train --resume {run}" in err
    assert (run / "checkpoints" / f"step_{n:06d}" / "trainer_state.json").exists(), "no checkpoint at the stop"
    assert _steps(run) == list(range(1, n + 1)) and n < 400
    return n


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tiny_overrides: list[str], tmp_path: Path) -> None:
    _interrupt(tiny_overrides, tmp_path / "t")


@pytest.mark.slow
def test_ctrl_c_then_resume_then_resume_of_the_finished_run(tiny_overrides: list[str], tmp_path: Path) -> None:
    run = tmp_path / "t"
    n = _interrupt(tiny_overrides, run)
    done = _train([f"train.steps={n + 1}"], "--resume", str(run))
    assert done.returncode == 0, done.stderr[-2000:]
    assert _steps(run) == list(range(1, n + 2))
    assert (run / "adapter" / "adapter_config.json").exists()
    again = _train([], "--resume", str(run))  # a finished run: says so, trains nothing
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished" in again.stdout + again.stderr
    assert _steps(run) == list(range(1, n + 2))


def test_a_second_ctrl_c_aborts_at_once_without_traceback(tiny_overrides: list[str], tmp_path: Path) -> None:
    run = tmp_path / "t"
    proc = _train_proc([*tiny_overrides, TOKEN_REWARD, "train.steps=400", "train.save_every=1"])
    _wait_for_lines(run / "metrics.jsonl", 2, proc)  # step 1's checkpoint is complete before step 2 is logged
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    # each assertion shows the run's output: this test failed once in a full suite on a loaded machine (2026-12-04)
    # and did not again in 8 runs, so the next failure's output is the evidence
    said = f"rc={proc.returncode}\n--- stdout\n{out[-1500:]}\n--- stderr\n{err[-3000:]}"
    assert proc.returncode == 130 and "Traceback" not in out + err, said
    assert "rl-small: interrupted" in err or "rl-small: stopped at step" in err, said
    assert not list((run / "checkpoints").glob(".tmp-*")), said
    from rl_small.checkpoint import list_checkpoints

    assert list_checkpoints(run), f"the last complete checkpoint is gone\n{said}"


def test_a_second_run_into_a_locked_directory_is_refused_naming_dir_and_pid(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    run = tmp_path / "t"
    code = ("import sys, time; from pathlib import Path; from rl_small.rundir import lock_run_dir; "
            "lock = lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        second = _train([*tiny_overrides, TOKEN_REWARD])
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert f"run directory '{run}' is in use by another process (pid {holder.pid})" in second.stderr
        assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
    finally:
        holder.kill()  # kill -9: the kernel releases the lock, so a later run is not blocked
        holder.wait()
    from rl_small.rundir import lock_run_dir

    lock_run_dir(run).release()


def test_a_new_run_into_the_directory_of_an_earlier_one_is_refused(tiny_overrides: list[str], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from rl_small.cli import main
    from rl_small.train import refuse_earlier_run

    run = tmp_path / "t"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "checkpoints" / "step_000001" / "trainer_state.json").write_text('{"step": 1}')
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit) as exc:
        main(["train", *tiny_overrides, TOKEN_REWARD])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    assert f"run directory '{run}' already holds a run (checkpoints): continue it with" in err
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    # an earlier run killed before its first checkpoint has nothing to resume: a new run starts over
    (run / "checkpoints" / "step_000001" / "trainer_state.json").unlink()
    refuse_earlier_run(run)
    assert not (run / "metrics.jsonl").exists()


def test_a_run_whose_final_evaluation_fails_keeps_its_adapter(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    import rl_small.eval
    from rl_small.train import run

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(rl_small.eval, "evaluate", broken)
    overrides = [*[o for o in tiny_overrides if not o.startswith("train.eval_after")], TOKEN_REWARD, *FAKE,
                 "train.eval_after=true", "train.eval_samples=2"]
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        run(argparse.Namespace(recipe=None, resume=None, overrides=overrides))
    assert (tmp_path / "t" / "adapter" / "adapter_config.json").exists()
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["adapter"].endswith("adapter") and "finished" not in summary


# ---- hang ---------------------------------------------------------------------------------------------------
def test_a_reward_hanging_past_its_timeout_is_counted_and_the_run_goes_on(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    # in-process: the abandoned call sleeps on in its thread, which a process exit would wait for
    hang = "rewards=[{name: 'tests.helpers:token_reward'}, {name: 'tests.helpers:hang', timeout_s: 0.5}]"
    tr = _trainer([*tiny_overrides, *FAKE, hang, "train.steps=2", "train.save_every=1"], tmp_path / "t")
    tr.fit()
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["reward/tests.helpers:hang/timeouts"] > 0 for r in rows)
    assert all(math.isfinite(r["loss/total"]) and r["optim/skipped_steps"] == 0 for r in rows)
    assert (tmp_path / "t" / "checkpoints" / "step_000002" / "trainer_state.json").exists()


# ---- leftovers ----------------------------------------------------------------------------------------------
def test_a_failed_save_leaves_no_temporary_and_stale_ones_are_removed(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from rl_small import checkpoint

    tr = _trainer(tiny_overrides + [TOKEN_REWARD, *FAKE, "train.steps=1"], tmp_path / "run")
    tr.fit()
    real_save = torch.save

    def disk_full(obj: object, path: object, *a: object, **k: object) -> None:
        if str(path).endswith("state.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    tr.step_no = 2
    with pytest.raises(OSError, match="No space left"):
        tr.save()
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000001"], "a failed save left files behind"
    (ckpts / ".tmp-killed").mkdir()  # what a kill -9 during a save leaves
    (ckpts / ".tmp-killed" / "trainable.pt").write_bytes(b"x" * 1000)
    assert checkpoint.clean_temporaries(tmp_path / "run") == [ckpts / ".tmp-killed"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000001"]


def test_resume_truncates_metrics_to_the_resumed_step(tmp_path: Path) -> None:
    from rl_small.tracking import truncate_metrics

    lines = [json.dumps({"step": s, "loss/total": 0.1 * s}) for s in range(1, 6)] + ['{"step": 6, "loss/t']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert truncate_metrics(tmp_path, 3) == 3
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert truncate_metrics(tmp_path, 3, is_main=True) == 0


def test_progress_eta_fills_in_after_the_first_step() -> None:
    import io

    from rich.console import Console

    from rl_small.tracking import Progress, eta_text

    assert eta_text(7, 100.0) == "eta 0:11:40" and eta_text(3, None) == "eta -:--:--"
    bar = Progress(10, 2, console=Console(file=io.StringIO(), width=200))
    time.sleep(0.05)
    least = time.perf_counter() - bar._t0  # the step's wall time is between these two, however loaded the machine
    bar.update({"timing/step": 0.05})
    most = time.perf_counter() - bar._t0
    eta = bar._bar.tasks[0].fields["eta"]
    bar.close()
    assert eta != "eta -:--:--" and eta_text(7, least) <= eta <= eta_text(7, most), (eta, least, most)
    assert least >= 0.05  # 7 steps of >= 0.05 s: not an eta of 0


def test_stop_request_first_signal_asks_second_aborts_and_handler_is_restored() -> None:
    from rl_small.distributed import World
    from rl_small.guards import StopRequest

    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest(World())
    try:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.agreed()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode; the sleep is interrupted
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is before


def test_under_torchrun_a_forwarded_repeat_is_one_request_and_sigterm_asks_to_stop(monkeypatch) -> None:  # noqa: ANN001
    """torchrun forwards the terminal's Ctrl-C to its workers, which got it already: the copy that follows at
    once must not abort the step. SIGTERM (scancel, preemption) asks for a stop after the step like Ctrl-C."""
    from rl_small.distributed import World
    from rl_small.guards import StopRequest

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = StopRequest(World())
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the forwarded copy: ignored
        time.sleep(0.05)
        assert stop.requested and stop.agreed()
        stop._first_at -= StopRequest.TORCHRUN_REPEAT_S  # a later, deliberate second Ctrl-C aborts
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.close()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    term = StopRequest(World())
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert term.requested
    finally:
        term.close()
    assert {s: signal.getsignal(s) for s in before} == before


def test_nonfinite_guard_resets_per_step_number_not_per_dict_identity() -> None:
    """The same stats dict object (or a new one at a freed one's address) for the next step must not hide a
    loss that is non-finite again."""
    from rl_small.distributed import World
    from rl_small.guards import NonFiniteGuard

    guard = NonFiniteGuard(max_in_row=10, world=World())
    stats = {"loss/total": float("nan")}
    assert guard.skip(0, stats, {"optim/grad_norm": 1.0})
    stats.clear()
    stats["loss/total"] = float("nan")  # step 1, same dict object
    assert guard.skip(1, stats, {"optim/grad_norm": 1.0}) and guard.in_row == 2
    assert not guard.skip(1, stats, {"optim/grad_norm": 1.0})  # same step, nothing new went bad


def test_ranks_agree_on_the_run_folder_across_a_second_boundary(monkeypatch) -> None:  # noqa: ANN001
    """Without train.run_name, each rank names the folder: under a launcher they take the launcher's start time
    (their common parent), not their own clock, so ranks started a second apart write to one folder."""
    from rl_small.config import load_recipe
    from rl_small.train import run_dir_for

    cfg = load_recipe(None, ["train.output_dir=/tmp/x"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    first = run_dir_for(cfg)
    time.sleep(1.1)
    assert run_dir_for(cfg) == first
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert run_dir_for(cfg) != first  # one process: its own start time


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.task=gsm8kk"], "unknown task 'gsm8kk'"),
    (["data.task=trl"], "answer_field"),
    (["data.task=trl", "data.answer_field=solution"], "set data.path"),
])
def test_held_out_data_problems_are_config_errors_not_tracebacks(overrides: list[str], message: str) -> None:
    """The held-out rows are read before the model (rl_small.train.eval_rows): a bad task there is a one-line
    RecipeError/DataError for run_cli, not a KeyError traceback."""
    from rl_small.config import load_recipe
    from rl_small.train import eval_rows

    with pytest.raises(ValueError, match=message) as info:  # RecipeError and DataError are ValueErrors
        eval_rows(load_recipe(None, overrides))
    assert type(info.value).__name__ in ("RecipeError", "DataError"), type(info.value)


def test_a_ctrl_c_while_the_process_exits_ends_it_quietly(tmp_path: Path) -> None:
    """A second Ctrl-C that reaches a run after its graceful stop finished (fast steps) lands in the
    interpreter's exit: it must end the process with 130, not print a KeyboardInterrupt traceback from an
    atexit finalizer (seen in CI)."""
    code = ("import atexit, time\n"
            "atexit.register(lambda: (print('exiting', flush=True), time.sleep(60)))\n"
            "from rl_small.guards import exit_process\n"
            "exit_process(0)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "exiting\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in out + err, err


def test_a_distributed_rank_exits_with_its_code_after_the_atexit_handlers(tmp_path: Path) -> None:
    """Under torch.distributed (2 gloo processes) exit_process runs the atexit handlers, then ends the
    process with the run's code without the interpreter teardown that aborted ranks now and then."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import atexit, os, sys, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        f"atexit.register(lambda: open(os.path.join({str(tmp_path)!r}, f'done{{rank}}'), 'w').write('ok'))\n"
        "from rl_small.guards import exit_process\n"
        "exit_process(3 if rank == 1 else 0)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 1 and "exitcode  : 3" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "done0").read_text() == "ok" and (tmp_path / "done1").read_text() == "ok"


def test_a_ctrl_c_while_the_stop_line_is_written_still_exits_130(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """Between the graceful stop (the default Ctrl-C handler is back) and the quiet exit, a second Ctrl-C can
    land inside run_cli's ``except`` block; it must end in 130, not a traceback out of the handler."""
    import argparse

    from rl_small import train
    from rl_small.guards import TrainingInterrupted

    def stopped(_args: argparse.Namespace) -> None:
        raise TrainingInterrupted(3, tmp_path)

    def ctrl_c(_text: str) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", stopped)
    monkeypatch.setattr(sys.stderr, "write", ctrl_c)
    assert train.run_cli(argparse.Namespace(resume=None)) == 130
