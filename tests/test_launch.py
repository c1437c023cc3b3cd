"""launch/: the Accelerate configs are valid for the installed accelerate, the shell scripts parse, local.sh
picks its config, and train.sbatch starts servers, waits for /health, launches the trainer and cleans up.

Nothing here needs a GPU: ``accelerate`` and ``rl-small`` are replaced by stubs on PATH.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
CONFIGS = sorted((LAUNCH / "accelerate").glob("*.yaml"))
SCRIPTS = [LAUNCH / "local.sh", LAUNCH / "slurm" / "train.sbatch"]
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash not installed")
# cpu: MULTI_GPU + use_cpu is Accelerate's torchrun launcher on the CPU, so --num_processes N is honoured
EXPECTED = {"cpu": "MULTI_GPU", "single_gpu": "NO", "ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED",
            "zero3": "DEEPSPEED"}


def test_expected_configs_exist() -> None:
    assert sorted(EXPECTED) == sorted(p.stem for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_is_valid(path: Path) -> None:
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cfg = load_config_from_file(str(path))  # unknown keys are an error in accelerate's loader
    assert cfg.distributed_type.value == EXPECTED[path.stem]
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "rl_small.train"])
    args, _, _ = _validate_launch_command(args)
    if path.stem != "cpu":
        assert args.mixed_precision == "bf16"
    else:
        assert args.use_cpu and args.num_processes == 1 and args.main_process_port == 0
    if path.stem == "fsdp":
        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_reshard_after_forward"] == "FULL_SHARD" and fsdp["fsdp_use_orig_params"] is True
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and args.use_fsdp
    if path.stem.startswith("zero"):
        assert args.use_deepspeed and cfg.deepspeed_config["zero_stage"] == int(path.stem[-1])


@needs_bash
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(path: Path) -> None:
    out = subprocess.run([BASH, "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _stubs(tmp_path: Path, python_exit: int = 1) -> dict[str, str]:
    """PATH with an ``accelerate`` that prints its arguments and a ``python`` that says 'no GPU'."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text('#!/bin/sh\nfor a in "$@"; do printf "[%s]" "$a"; done; echo\n')
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n" if python_exit < 0
                                    else f"#!/bin/sh\nexit {python_exit}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@needs_bash
def test_local_sh_default_and_accel_config(tmp_path: Path) -> None:
    env = _stubs(tmp_path)
    out = subprocess.run([BASH, str(LAUNCH / "local.sh"), "r.yaml", "train.steps=2"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"[--config_file][{LAUNCH}/accelerate/cpu.yaml][-m][rl_small.train][--recipe][r.yaml][train.steps=2]" in out.stdout
    out = subprocess.run([BASH, str(LAUNCH / "local.sh"), "r.yaml"], capture_output=True, text=True,
                         env={**env, "ACCEL_CONFIG": "ddp", "NUM_PROCESSES": "4"})
    assert out.returncode == 0, out.stderr
    assert f"[--config_file][{LAUNCH}/accelerate/ddp.yaml][--num_processes][4][-m]" in out.stdout
    out = subprocess.run([BASH, str(LAUNCH / "local.sh"), "r.yaml"], capture_output=True, text=True,
                         env={**env, "ACCEL_CONFIG": "nosuch"})
    assert out.returncode == 2 and "fsdp" in out.stderr and "zero3" in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


FAKE_SERVE = """\
#!{python}
# Stub of `rl-small serve`: answers /health on --port after a short start, until killed.
import http.server, sys, time
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
if {fail}:
    print("CUDA out of memory", file=sys.stderr)
    sys.exit(3)
time.sleep(0.3)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _sbatch(tmp_path: Path, fail: bool) -> tuple[subprocess.CompletedProcess[str], int]:
    env = _stubs(tmp_path, python_exit=-1)
    (tmp_path / "bin" / "rl-small").write_text(FAKE_SERVE.format(python=sys.executable, fail=fail))
    (tmp_path / "bin" / "rl-small").chmod(0o755)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    port = _free_port()
    env = {**env, "GPUS_PER_NODE": "2", "PORT": str(port), "HEALTH_POLL_S": "0.2", "SERVER_TIMEOUT": "30",
           "LOG_DIR": str(tmp_path / "logs"), "SLURM_JOB_NODELIST": "127.0.0.1"}
    env.pop("DRY_RUN", None)
    out = subprocess.run([BASH, str(LAUNCH / "slurm" / "train.sbatch"), str(recipe), "train.steps=2"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=LAUNCH.parent)
    return out, port


@needs_bash
def test_sbatch_one_node_waits_for_health_then_trains_and_stops_the_server(tmp_path: Path) -> None:
    out, port = _sbatch(tmp_path, fail=False)
    assert out.returncode == 0, out.stderr
    assert f"vLLM server ready: http://127.0.0.1:{port}" in out.stdout
    assert (f"[--num_processes][1][--num_machines][1][-m][rl_small.train][--recipe][{tmp_path / 'r.yaml'}]"
            f"[rollout.backend=vllm_server][rollout.server_urls=[http://127.0.0.1:{port}]][train.steps=2]") in out.stdout
    assert "single_gpu.yaml" in out.stdout  # one trainer GPU left: no DDP
    with socket.socket() as s:  # the server was stopped at exit
        assert s.connect_ex(("127.0.0.1", port)) != 0


@needs_bash
def test_sbatch_fails_with_the_server_log_when_a_server_dies(tmp_path: Path) -> None:
    out, _ = _sbatch(tmp_path, fail=True)
    assert out.returncode == 1
    assert "exited" in out.stderr and "CUDA out of memory" in out.stderr
    assert "rl_small.train" not in out.stdout


@needs_bash
def test_sbatch_several_nodes_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "DRY_RUN": "1", "GPUS_PER_NODE": "8", "SLURM_JOB_NODELIST": "n1,n2,n3", "VLLM_GPUS": "2"}
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if not (Path(p) / "scontrol").exists())
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    out = subprocess.run([BASH, str(LAUNCH / "slurm" / "train.sbatch"), str(recipe), "model.name=models/m"], env=env,
                         capture_output=True, text=True, cwd=LAUNCH.parent)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    serve = [line for line in lines if "rl-small serve" in line]
    assert [line.split("--port ")[1].split()[0] for line in serve] == ["8100", "8101"]
    assert all(line.endswith("--host 0.0.0.0 rollout.gpu_memory_utilization=0.9 model.name=models/m") for line in serve)
    srun = textwrap.dedent(lines[-1])
    assert srun.startswith("+ srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --nodelist=n2,n3 bash -c")
    for part in ("--num_processes 16 --num_machines 2 --machine_rank $SLURM_PROCID --main_process_ip n2",
                 "ddp.yaml", r"rollout.server_urls=\[http://n1:8100\,http://n1:8101\] model.name=models/m"):
        assert part in srun, srun
