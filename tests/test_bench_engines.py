"""bench/engines.py on 2 CPU processes: both engine rows train a tiny Llama and agree on the losses.

The GPU comparison (FSDP2 + CPU offload vs DeepSpeed ZeRO-3 + CPU offload) runs the same code with the 8B
shape; this checks the harness (config, build, the trainer's steps, teardown between rows, the JSON).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_engines_bench_runs_both_rows_on_cpu(tmp_path):
    out = tmp_path / "engines.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "bench.engines",
        "--tiny",
        "--device",
        "cpu",
        "--seqs",
        "256",
        "--steps",
        "1",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["engine"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fsdp2_offload", "ds_z3_offload"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["step_s"] > 0 and len(row["losses"]) == 2
    # Same init, same tokens, same AdamW (fp32 on CPU): the two engines train the same model.
    assert rows["fsdp2_offload"]["losses"] == pytest.approx(rows["ds_z3_offload"]["losses"], rel=1e-5)
