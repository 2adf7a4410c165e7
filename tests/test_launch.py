"""Launch scripts: syntax, and the exact command printed by LONGCTX_DRY_RUN=1 with a fake Slurm."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm.sbatch"
LOCAL = ROOT / "launch" / "local.sh"


@pytest.mark.parametrize("script", [SBATCH, LOCAL], ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def _fake_slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    # `scontrol show hostnames <nodelist>` expands the node list, one host per line. The long tail makes
    # `| head -n1` close the pipe early: scontrol dying of SIGPIPE must not abort the script (pipefail).
    scontrol.write_text(
        '#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] || exit 1\n'
        'printf "gpu-a17\\ngpu-a18\\n"; seq -f "gpu-z%g" 1 50000\n'
    )
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LONGCTX_", "GPUS_PER_NODE"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        LONGCTX_DRY_RUN="1",
        LONGCTX_ROOT=str(ROOT),
        SLURM_JOB_NODELIST="gpu-a[17-18]",
        SLURM_NNODES="2",
        SLURM_JOB_ID="4242",
        GPUS_PER_NODE="4",
        SLURM_CPUS_ON_NODE="64",
        CONFIG="configs/long.yaml",
        OVERRIDES="parallel.cp=8 training.steps=10",
        TORCH_FR_DUMP_TEMP_FILE=str(tmp_path / "fr" / "rank"),
    )
    env.update(extra)
    return env


def _dry_run(cmd: list[str], env: dict[str, str]) -> list[str]:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout
    return shlex.split(lines[0])


def _after(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


def test_sbatch_torchrun_dry_run(tmp_path):
    words = _dry_run(["bash", str(SBATCH), "data.seq_len=4096"], _fake_slurm_env(tmp_path))
    assert words[0] == "srun" and _after(words, "--ntasks-per-node") == "1"
    assert _after(words, "--cpus-per-task") == "64"  # the node's CPUs go to the one torchrun task
    tr = words[words.index("torchrun") :]
    assert _after(tr, "--nnodes") == "2"
    assert _after(tr, "--nproc_per_node") == "4"
    assert _after(tr, "--rdzv_backend") == "c10d"
    assert _after(tr, "--rdzv_endpoint") == "gpu-a17:29500"
    assert _after(tr, "--rdzv_id") == "4242"
    assert "SIGUSR1" in _after(tr, "--signals-to-handle")
    assert tr[tr.index("train.py") :] == [
        "train.py",
        "--config",
        "configs/long.yaml",
        "parallel.cp=8",
        "training.steps=10",
        "data.seq_len=4096",
    ]


def test_sbatch_per_gpu_dry_run(tmp_path):
    env = _fake_slurm_env(tmp_path, LONGCTX_SRUN_MODE="per-gpu", MASTER_PORT="29611")
    words = _dry_run(["bash", str(SBATCH)], env)
    assert words[0] == "srun" and _after(words, "--ntasks-per-node") == "4"
    assert _after(words, "--cpus-per-task") == "16"
    assert _after(words, "--ntasks") == "8"  # 2 nodes x 4: the job's SLURM_NTASKS=2 must not win
    assert "torchrun" not in words
    assert "MASTER_ADDR=gpu-a17" in _after(words, "--export") and "MASTER_PORT=29611" in _after(
        words, "--export"
    )
    task = _after(words, "-c")
    for mapping in ("RANK=$SLURM_PROCID", "LOCAL_RANK=$SLURM_LOCALID", "WORLD_SIZE=$SLURM_NTASKS"):
        assert mapping in task, task
    assert words[words.index("train.py") - 1] == "python"

    # the per-task mapping really yields the env:// variables
    probe = subprocess.run(
        ["bash", "-c", task, "bash", "-c", "echo $RANK $LOCAL_RANK $WORLD_SIZE"],
        env={**env, "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"},
        capture_output=True,
        text=True,
    )
    assert probe.stdout.split() == ["5", "1", "8"]


def test_sbatch_processes_per_node(tmp_path):
    """GPUS_PER_NODE wins; else the job's GPUs, also from --gpus-per-node=type:N; a GPU-less job must say
    how many processes it wants instead of silently starting 8."""

    def nproc(**env: str) -> str:
        base = _fake_slurm_env(tmp_path, **env)
        base.pop("GPUS_PER_NODE")
        base.update(env)
        return _after(_dry_run(["bash", str(SBATCH)], base), "--nproc_per_node")

    assert nproc() == "8"
    assert nproc(SLURM_GPUS_PER_NODE="h100:4") == "4"
    assert nproc(SLURM_GPUS_ON_NODE="2", SLURM_GPUS_PER_NODE="2") == "2"
    assert nproc(GPUS_PER_NODE="3", SLURM_GPUS_PER_NODE="0") == "3"
    env = _fake_slurm_env(tmp_path, SLURM_GPUS_PER_NODE="0")
    env.pop("GPUS_PER_NODE")
    res = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "set GPUS_PER_NODE" in res.stderr, res.stderr
    assert "#SBATCH --cpus-per-task" not in SBATCH.read_text()  # a fixed count can exceed a node's CPUs


def test_sbatch_bad_mode(tmp_path):
    env = _fake_slurm_env(tmp_path, LONGCTX_SRUN_MODE="mpi")
    res = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "LONGCTX_SRUN_MODE" in res.stderr


def test_local_dry_run(tmp_path):
    env = {**os.environ, "LONGCTX_DRY_RUN": "1"}
    words = _dry_run(["bash", str(LOCAL), "3", "--config", "configs/demo.yaml", "training.steps=2"], env)
    assert words[:4] == ["torchrun", "--standalone", "--nproc_per_node", "3"]
    assert words[-4:] == [str(ROOT / "train.py"), "--config", "configs/demo.yaml", "training.steps=2"]
    default = _dry_run(["bash", str(LOCAL), "--config", "x.yaml"], env)
    assert default[default.index("--nproc_per_node") + 1].isdigit()


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def test_one_failing_rank_stops_the_job_quickly(backend):
    """A rank that raises must not hang in the process-group tear-down while its peer waits in a
    collective (NCCL's destroy can block until the collective timeout, here 5 minutes): the job exits
    non-zero within seconds with the failing rank's traceback."""
    import sys
    import time

    import torch

    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    root = Path(__file__).resolve().parents[1]
    t0 = time.monotonic()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "tests/fail_one_rank.py",
            backend,
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert res.returncode != 0
    assert "injected failure on rank 1" in res.stderr
    assert time.monotonic() - t0 < 120
