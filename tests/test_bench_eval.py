"""bench/eval_throughput.py on 2 CPU processes (gloo, tiny Llama, cp=2): each row times the evaluation
forward and the training step of the same shape and writes both, with their ratio, to the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eval_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "eval.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "bench.eval_throughput", "--model", "tiny", "--device", "cpu", "--seqs", "256",
        "--steps", "1", "--mlp-chunks", "2", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert "eval_error" not in row and "train_error" not in row, row
    assert row["seq"] == 256 and row["eval_tok_s_gpu"] > 0 and row["train_tok_s_gpu"] > 0
    assert abs(row["ratio"] - row["eval_tok_s_gpu"] / row["train_tok_s_gpu"]) < 1e-9
    assert "| tiny | 256 |" in proc.stdout
