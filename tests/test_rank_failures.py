"""A data error under torchrun reaches the user as one line from one rank, whichever ranks hit it, and
every rank exits with the same code (trainer/rank_failures.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _torchrun(tmp_path: Path, script: list[str], *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--monitor-interval", "0.1",
        *script, "--config", "configs/demo.yaml", "parallel.dp=1", "parallel.cp=2", "training.steps=3",
        f"output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _check_one_report(proc: subprocess.CompletedProcess) -> str:
    """Exactly one `error:` line, no traceback from our code, exit code 1 from both ranks (torchrun's
    failure table lists each failed rank with its exit code); returns the error line."""
    err = proc.stderr
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, err[-4000:]
    # torchrun's own launcher traceback (ChildFailedError) is not ours; none may come from the ranks.
    assert 'train.py", line' not in err and "/trainer/" not in err, err[-4000:]
    codes = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", err))
    assert codes == {"0": "1", "1": "1"}, err[-4000:]
    return errors[0]


def test_missing_data_file_is_reported_once(tmp_path):
    proc = _torchrun(tmp_path, ["train.py"], f"data.path={tmp_path}/missing.jsonl")
    line = _check_one_report(proc)
    assert line == f"error: data.path: {tmp_path}/missing.jsonl: no such file or directory"


def test_bad_row_reported_by_the_rank_that_read_it(tmp_path):
    """Rank 0 tokenises and meets the bad row; rank 1 only learns that rank 0 failed. The user reads
    rank 0's message, the one that names the row."""
    data = tmp_path / "bad.jsonl"
    rows = [json.dumps({"text": f"document {i} " * 50}) for i in range(20)]
    rows[7] = '{"text": "unterminated'
    data.write_text("\n".join(rows) + "\n")
    line = _check_one_report(_torchrun(tmp_path, ["train.py"], f"data.path={data}"))
    assert line.startswith(f"error: {data} line 8: malformed JSON"), line


def test_error_seen_by_one_rank_only_is_still_reported(tmp_path):
    """Rank 1 alone cannot find its data (a node-local path missing on one node). Rank 0 carries on into
    the first collective; rank 1 must still print the error, and rank 0 must exit with it quietly."""
    missing = tmp_path / "node-local" / "data.jsonl"
    proc = _torchrun(tmp_path, ["tests/rank_data_path.py", "1", str(missing)])
    line = _check_one_report(proc)
    assert line == f"error: data.path: {missing}: no such file or directory"
