"""launch/slurm.sbatch on a real (single-node, localhost) Slurm cluster: the job trains, and USR1 sent
to the batch shell - what `#SBATCH --signal=B:USR1@120` does before the time limit - makes it save,
requeue itself and resume from the saved step. Skipped, with the reason, where Slurm is not installed
(.ci/run installs slurm-wlm and munge) or cannot start."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import LocalSlurm, SlurmUnavailable, _free_port, missing_reason

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24  # enough that USR1 (sent after step 3 is logged) lands well before the end on a loaded machine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    reason = missing_reason()
    if reason:
        pytest.skip(f"Slurm test skipped: {reason}")
    slurm = LocalSlurm()
    try:
        slurm.up()
    except SlurmUnavailable as exc:
        pytest.skip(f"Slurm test skipped: the local cluster did not start: {exc}")
    try:
        yield slurm
    finally:
        slurm.down()


def _wait(what: str, predicate, timeout_s: float, describe) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}\n{describe()}")


def _steps(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def test_sbatch_trains_then_usr1_saves_requeues_and_resumes(cluster, tmp_path):
    out = tmp_path / "run"
    env = {
        **cluster.env,
        "GPUS_PER_NODE": "2",  # a job without GPUs runs gloo on CPU: the script needs the process count
        "MASTER_PORT": str(_free_port()),
        "PYTHONPATH": str(ROOT),
        "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / "flight_recorder" / "rank"),
        "WANDB_MODE": "offline",
    }
    submit = subprocess.run(
        [
            "sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--output={tmp_path}/slurm-%j.out",
            "launch/slurm.sbatch", "--config", "configs/demo.yaml", "parallel.dp=1", "parallel.cp=2",
            f"training.steps={STEPS}", "logging.every=1", f"output_dir={out}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job}.out"

    def describe() -> str:
        text = log.read_text(errors="replace") if log.exists() else "(no job output yet)"
        return f"job {job}: {cluster.job(job)}\n--- job output (tail)\n{text[-4000:]}\n{cluster.logs(15)}"

    def state() -> str:
        return cluster.job(job).get("JobState", "")

    metrics = out / "metrics.jsonl"
    _wait("the job to train 3 steps", lambda: len(_steps(metrics)) >= 3 or state() in ("FAILED", "COMPLETED"),
          240, describe)  # fmt: skip
    assert state() == "RUNNING" and len(_steps(metrics)) < STEPS, describe()

    # What Slurm itself does 120 s before the time limit (--signal=B:USR1@120): USR1 to the batch shell.
    sig = subprocess.run(
        ["scancel", "--signal=USR1", "--batch", job], env=env, capture_output=True, text=True
    )
    assert sig.returncode == 0, sig.stderr
    _wait(
        "the requeued job to finish", lambda: state() in ("COMPLETED", "FAILED", "CANCELLED"), 300, describe
    )

    text = log.read_text()
    info = cluster.job(job)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", describe()
    saved = re.search(r"(?:SIGUSR1|signal 10) received: saving step (\d+)", text)
    assert saved, describe()
    k = int(saved.group(1))
    assert 3 <= k < STEPS
    assert f"requeueing job {job}" in text and "restart 1" in text, describe()
    assert f"resumed from step {k}\n" in text, describe()
    assert (out / "checkpoints" / f"step_{k:08d}" / "COMPLETE.json").is_file()

    # One loss curve: the first run logged 1..k, the requeued one k+1..STEPS, continuing (not from scratch).
    rows = _steps(metrics)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), describe()
    loss = {r["step"]: r["loss"] for r in rows}
    assert loss[k + 1] < loss[1] - 0.2, (k, loss)  # a fresh start repeats step 1 exactly
    assert loss[STEPS] < loss[1] - 2.0, loss
    assert json.loads((out / "summary.json").read_text())["final_step"] == STEPS
