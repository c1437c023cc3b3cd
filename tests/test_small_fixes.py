"""Small first-run annoyances: no library FutureWarning on every command, no runs/ folder left in the
checkout by the tests, and an Accelerate CPU config that runs the process count it is given."""

from __future__ import annotations

import warnings
from pathlib import Path


def test_loading_a_lora_policy_prints_no_future_warning(tiny_model_dir: Path) -> None:
    from rl_small.config import ModelConfig
    from rl_small.models import load_adapter, load_policy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what a terminal shows
        model, _ = load_policy(ModelConfig(name=str(tiny_model_dir)))
        model.save_pretrained(tiny_model_dir.parent / "adapter_fw")
        base, _ = load_policy(ModelConfig(name=str(tiny_model_dir), lora=None))
        load_adapter(base, tiny_model_dir.parent / "adapter_fw")
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert future == [], future
    with warnings.catch_warnings(record=True) as caught:  # only that message: others still show
        warnings.simplefilter("default")
        from rl_small.models import quiet_peft_deprecation

        quiet_peft_deprecation()
        warnings.warn("some other deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["some other deprecation"]


PROBE = """
import json, os, sys, torch
from accelerate import Accelerator
acc = Accelerator(cpu=not torch.cuda.is_available())
backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
with open(os.path.join(sys.argv[1], f"rank{acc.process_index}.json"), "w") as f:
    json.dump({"n": acc.num_processes, "backend": backend, "cpu": acc.device.type}, f)
"""


def test_cpu_accelerate_config_runs_the_process_count_it_is_given(tmp_path: Path) -> None:
    """``accelerate launch --config_file launch/accelerate/cpu.yaml --num_processes 2`` starts two CPU processes
    on gloo (it used to start one, silently); without the flag it starts one."""
    import json
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher, "accelerate CLI missing"
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    for n in (2, 1):
        out = tmp_path / f"n{n}"
        out.mkdir()
        flag = ["--num_processes", "2"] if n == 2 else []
        proc = subprocess.run([launcher, "launch", "--config_file", str(root / "launch/accelerate/cpu.yaml"), *flag,
                               str(probe), str(out)], capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        ranks = sorted(json.loads(p.read_text())["n"] for p in out.glob("rank*.json"))
        assert ranks == [n] * n, (n, ranks, proc.stderr[-1000:])
        assert all(json.loads(p.read_text())["cpu"] == "cpu" for p in out.glob("rank*.json"))
    assert json.loads((tmp_path / "n2" / "rank0.json").read_text())["backend"] == "gloo"
