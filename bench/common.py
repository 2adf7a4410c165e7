"""Shared benchmark helpers: process-group setup, CUDA-event timing, result files."""

from __future__ import annotations

import datetime
import gc
import json
import os
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist


def local_device(device_type: str = "cuda") -> torch.device:
    """This rank's device: the CPU for gloo smoke runs, else the GPU torchrun (or init_dist) selected."""
    return torch.device("cpu") if device_type == "cpu" else torch.device("cuda", torch.cuda.current_device())


def free_memory(device: torch.device) -> None:
    """Return what a finished row held: Python garbage, compiled graphs, the CUDA cache and the pinned
    host-memory cache (FSDP2's offloaded parameters are pinned; the next row's offload would otherwise come
    on top)."""
    gc.collect()
    torch._dynamo.reset()  # a row's compiled graphs (parallel.compile) are its own, as in a fresh run
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def describe_error(exc: BaseException, limit: int = 200) -> str:
    """A failed row's `error`: kind, the start of the message and the innermost repo frames - where an OOM
    struck decides which memory lever comes next, and a bare message does not say."""
    kind = "OOM" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
    frames = [
        f"{os.path.relpath(f.filename, _REPO)}:{f.lineno}"
        for f in traceback.extract_tb(exc.__traceback__)
        if f.filename.startswith(_REPO)
    ]
    where = f" [at {' < '.join(reversed(frames[-3:]))}]" if frames else ""
    return f"{kind}: {str(exc)[:limit]}{where}"


def init_dist(device_type: str = "cuda") -> tuple[int, int]:
    """Join the torchrun process group (NCCL; gloo for CPU smoke runs) or run alone; returns (rank, world).
    On CUDA the device is picked as the trainer picks it, expandable_segments included: an OOM threshold
    measured with another allocator setting would not be the trainer's."""
    if device_type != "cpu":
        from trainer.distributed import pick_device

        pick_device("cuda")
    if "RANK" in os.environ and not dist.is_initialized():
        if device_type == "cpu":
            dist.init_process_group("gloo")
            return dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
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


def time_ms(
    fn: Callable[[], object], warmup: int = 3, iters: int = 10, device: torch.device | None = None
) -> float:
    """Median milliseconds of `fn` over `iters` runs after `warmup` (CUDA events; the host clock on a CPU
    `device`), the slowest rank's median when distributed."""
    gpu = device is None or device.type == "cuda"
    for _ in range(warmup):
        fn()
    if gpu:
        torch.cuda.synchronize()
    barrier()
    times = []
    for _ in range(iters):
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return max_over_ranks(statistics.median(times))


def max_over_ranks(x: float | list[float]) -> float | list[float]:
    """The max over ranks of a number, or element-wise of a list of numbers."""
    nccl = not dist.is_initialized() or dist.get_backend() == "nccl"  # gloo groups reduce CPU tensors
    values = x if isinstance(x, list) else [x]
    device = "cuda" if nccl and torch.cuda.is_available() else "cpu"
    t = torch.tensor(values, device=device, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist() if isinstance(x, list) else t.item()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a host clock then times it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def run_meta(args, device: torch.device, **extra) -> dict:
    """The header every result file carries: date, card (or the CPU smoke run), torch, the command's args."""
    return dict(
        date=datetime.date.today().isoformat(),
        gpu=gpu_name() if device.type == "cuda" else "cpu (smoke run)",
        torch=torch.__version__,
        args=vars(args),
        **extra,
    )


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


def random_batches(cfg, step: int) -> list[dict[str, torch.Tensor]]:
    """One micro-batch in the data loader's format (int64 CPU tensors [1, S]), the same on every rank
    (seeded by the step): random tokens, one document, positions 0..S-1."""
    seq, vocab = cfg.training.seq_len, cfg.model.config["vocab_size"]
    ids = torch.randint(0, vocab, (1, seq + 1), generator=torch.Generator().manual_seed(step))
    return [
        dict(
            input_ids=ids[:, :-1],
            labels=ids[:, 1:],
            position_ids=torch.arange(seq)[None],
            doc_ids=torch.zeros(1, seq, dtype=torch.long),
        )
    ]
