"""Parts a library does: the LR schedule (transformers.get_scheduler, warm-up one step ahead), seeding
(accelerate.utils.set_seed) and the metric sinks (Accelerate trackers behind train.trackers)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from rl_small.builders import make_scheduler, seed_everything
from rl_small.config import dump_config, load_recipe
from rl_small.tracking import Tracker


def _lrs(schedule: str, warmup: int, steps: int, resume_at: int | None = None) -> list[float]:
    """The LR of each of ``steps`` optimizer steps (base LR 1); with ``resume_at`` optimizer and scheduler are
    rebuilt there and loaded from their state_dicts, as a resumed run does."""
    cfg = load_recipe(None, [f"optim.schedule={schedule}", f"optim.warmup_steps={warmup}", f"train.steps={steps}",
                             "optim.lr=1.0"])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(opt, cfg)
    out = []
    for step in range(steps):
        if step == resume_at:
            state, opt_state = sched.state_dict(), opt.state_dict()
            opt = torch.optim.SGD([p], lr=1.0)
            sched = make_scheduler(opt, cfg)  # then the checkpoint's states, in rl_small.checkpoint's order
            opt.load_state_dict(opt_state)
            sched.load_state_dict(state)
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(("schedule", "warmup", "expected"), [
    ("constant", 0, [1, 1, 1, 1, 1]),
    ("constant", 2, [1 / 2, 1, 1, 1, 1]),  # the first step trains at lr / warmup, not at 0
    ("linear", 0, [1, 4 / 5, 3 / 5, 2 / 5, 1 / 5]),  # (T - s) / (T - w): the last step is not at 0 either
    ("linear", 2, [1 / 2, 1, 1, 2 / 3, 1 / 3]),
    ("cosine", 2, [1 / 2, 1, 1, (1 + math.cos(math.pi / 3)) / 2, (1 + math.cos(2 * math.pi / 3)) / 2]),
    ("cosine", 0, [(1 + math.cos(math.pi * s / 5)) / 2 for s in range(5)]),
    ("linear", 4, [1 / 4, 2 / 4, 3 / 4, 1, 1]),  # warm-up longer than the decay
    ("linear", 5, [1 / 5, 2 / 5, 3 / 5, 4 / 5, 1]),  # warm-up to the last step: it trains at lr, not 0
    ("linear", 7, [1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7]),
])
def test_lr_sequence_by_hand(schedule: str, warmup: int, expected: list[float]) -> None:
    assert _lrs(schedule, warmup, 5) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_schedule_resumes_from_its_state(schedule: str) -> None:
    assert _lrs(schedule, 3, 9, resume_at=4) == _lrs(schedule, 3, 9)


def test_seed_everything_seeds_python_numpy_and_torch() -> None:
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), float(np.random.rand()), torch.rand(3).tolist())
    torch.rand(5), random.random(), np.random.rand()  # move every generator on
    seed_everything(123)
    assert (random.random(), float(np.random.rand()), torch.rand(3).tolist()) == expected


class _MemoryTracker:
    """A registered Accelerate tracker that keeps what it is given."""

    name, requires_logging_directory, main_process_only = "memory", False, True
    runs: ClassVar[list[_MemoryTracker]] = []

    def __init__(self, run_name: str, **kwargs: Any) -> None:
        self.run_name, self.kwargs, self.config, self.logged, self.finished = run_name, kwargs, None, [], False
        _MemoryTracker.runs.append(self)

    def start(self) -> None:
        pass

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self.config = values

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(values)))

    def finish(self) -> None:
        self.finished = True


def test_trackers_receive_the_metrics_and_the_resolved_config(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate import tracking

    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "memory", _MemoryTracker)
    tracker = Tracker(tmp_path, ["memory"])  # before config.yaml, as in rl_small.train
    dump_config(load_recipe(None, ["algo.name=ppo", "algo.gamma=0.5"]), tmp_path / "config.yaml")
    tracker.log(3, {"reward/total": 0.25})
    tracker.log(4, {"reward/total": 0.5})
    tracker.close()
    run = _MemoryTracker.runs[-1]
    assert run.run_name == "rl-small" and run.kwargs == {} and run.finished
    assert run.logged == [(3, {"reward/total": 0.25}), (4, {"reward/total": 0.5})]
    assert run.config["algo.gamma"] == 0.5 and run.config["algo.name"] == "ppo"
    assert run.config["algo.clip"] == "[0.2, 0.2]"  # lists as JSON text: trackers take scalars
    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "wandb", _MemoryTracker)
    Tracker(tmp_path, ["wandb"])
    assert _MemoryTracker.runs[-1].kwargs == {"name": tmp_path.name}  # a wandb run named after the run directory
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["reward/total"]) for x in lines] == [(3, 0.25), (4, 0.5)]  # metrics.jsonl: always


def test_default_trackers_are_tensorboard_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import accelerate.utils
    from accelerate import tracking

    made: list[tuple[Any, ...]] = []

    class FakeTensorBoard(_MemoryTracker):
        requires_logging_directory = True

        def __init__(self, run_name: str, logging_dir: str) -> None:
            made.append((run_name, logging_dir))
            super().__init__(run_name)

    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "tensorboard", FakeTensorBoard)
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    assert Tracker(tmp_path, None).sinks == []
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: True)
    assert len(Tracker(tmp_path, None).sinks) == 1 and made == [("tb", str(tmp_path))]  # run_dir/tb, as before
    assert Tracker(tmp_path, []).sinks == [] and Tracker(tmp_path, ["memory"], is_main=False).sinks == []
