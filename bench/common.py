"""Shared benchmark helpers: process-group setup, CUDA-event timing, result files."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from collections.abc import Callable

import torch
import torch.distributed as dist


def init_dist() -> tuple[int, int]:
    """Join the torchrun process group (NCCL) or run alone; returns (rank, world)."""
    if "RANK" in os.environ and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def log0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of `fn` over `iters` runs (CUDA events), slowest rank's median when distributed."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    barrier()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    med = torch.tensor([statistics.median(times)], device="cuda")
    if dist.is_initialized():
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return med.item()


def max_over_ranks(x: float) -> float:
    t = torch.tensor([x], device="cuda", dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        return out.splitlines()[0] if out else torch.cuda.get_device_name()
    except (OSError, subprocess.SubprocessError):
        return torch.cuda.get_device_name()


def write_results(path: str | None, rows: list[dict], meta: dict) -> None:
    if path and (not dist.is_initialized() or dist.get_rank() == 0):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.1f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
