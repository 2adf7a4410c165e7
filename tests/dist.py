"""Run a test function on N CPU processes joined in a gloo process group.

Each spawned rank pays the torch + transformers import, so a test should run many checks inside one
group (pass a list of cases) rather than start one group per check.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any

_CTX = None


def _context():
    # forkserver: children fork from a clean server that has already imported torch, which is both
    # fast and safe (forking the pytest process itself can deadlock OpenMP after it ran tensor ops).
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # `models` first: it installs the filter for torchao's import noise before transformers imports it.
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "models", "transformers"])
    return _CTX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Rank 0 hosts the TCPStore: it must not tear down while a peer still sets up a sub-group through
        # it (seen as "Connection reset by peer" in new_group on a loaded CI machine).
        dist.barrier()
        # Plain pickle copies tensor data; the queue's own pickler would pass shared-memory handles that
        # die with this process before the parent reads them.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - any failure must reach the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 300) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result.

    Raises AssertionError with the first failing rank's traceback, or on timeout.
    """
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    except Exception as exc:  # queue.Empty on timeout
        errors.append(f"timed out after {timeout}s waiting for ranks ({type(exc).__name__})")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError(errors[0])
    return [results[r] for r in range(world_size)]
