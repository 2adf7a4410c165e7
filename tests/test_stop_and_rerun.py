"""Ctrl-C and re-runs, as a user meets them: the first SIGINT saves after the current step and exits
cleanly on every rank (torchrun's forwarded copy counts as the same press), a second one aborts; a re-run
of a finished run in its output_dir says so, trains nothing and leaves summary.json as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "training.seq_len=128",
    "model.config.num_hidden_layers=2",
    "logging.every=1",
    "logging.progress=false",
    "checkpoint.export_hf=false",
]


def _args(out, *extra) -> list[str]:
    return [
        "train.py",
        "--config",
        "configs/demo.yaml",
        *TINY,
        f"output_dir={out}",
        f"data.cache_dir={out}/cache",
        *extra,
    ]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT}


def _wait_for_steps(path: str, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if os.path.isfile(path) and len(open(path).readlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps in {path} (exit code {proc.poll()})")


def test_ctrl_c_under_torchrun_saves_after_the_step(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += _args(out, "parallel.dp=2", "parallel.cp=1", "training.steps=1000")
    # Its own session: the signal goes to the launcher and both ranks at once, as Ctrl-C in a terminal does.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_steps(f"{out}/metrics.jsonl", 3, proc)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE.json").is_file())
    assert len(saved) == 1 and 3 <= int(saved[0][5:]) < 1000, (saved, stderr[-2000:])
    assert "KeyboardInterrupt" not in stderr and 'train.py", line' not in stderr, stderr[-3000:]
    assert stderr.count("Ctrl-C: saving after the current step") == 1, stderr[-3000:]
    assert f"SIGINT received: saving step {int(saved[0][5:])}" in stdout, stdout[-2000:]


ABORT = """
import os, signal, sys, time
from trainer.signals import StopSignal
stop = StopSignal()
os.kill(os.getpid(), signal.SIGINT)
os.kill(os.getpid(), signal.SIGINT)  # torchrun's forwarded copy: the same press
print("flag", stop.name, flush=True)
time.sleep(1.5)
os.kill(os.getpid(), signal.SIGINT)  # pressed again
time.sleep(5)
print("still running", flush=True)
"""


def test_second_ctrl_c_aborts_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-c", ABORT], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert "flag SIGINT" in proc.stdout and "still running" not in proc.stdout
    assert "Traceback" not in proc.stderr and "aborting without saving" in proc.stderr, proc.stderr


def test_rerun_of_a_finished_run_trains_nothing_and_keeps_its_summary(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, *_args(out, "parallel.dp=1", "parallel.cp=1", "training.steps=2")]
    first = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = (out / "summary.json").read_text()
    metrics = (out / "metrics.jsonl").read_text()
    assert json.loads(summary)["final_loss"] is not None

    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    said = again.stdout + again.stderr
    assert "run complete" in said and "training.steps=" in said and "new output_dir" in said, said[-2000:]
    assert (out / "summary.json").read_text() == summary
    assert (out / "metrics.jsonl").read_text() == metrics
