"""Process-group start-up and tear-down (the only place that reads torchrun's environment)."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist

PEER_GRACE_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: str, expandable_segments: bool = True) -> torch.device:
    if expandable_segments and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        # Must be set before the first CUDA allocation; a user's own setting wins.
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from parallel.dims import ConfigError

        raise ConfigError("training.device", "cuda requested but no CUDA device is visible")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def init_distributed(device: torch.device, timeout_min: float = 30) -> tuple[int, int]:
    """Join (or, run without torchrun, create) the default process group; returns (rank, world_size).
    The timeout is long while ranks load models; `shorten_timeout` tightens it after the first step."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python train.py`: a world of one
            os.environ.update(
                RANK="0",
                WORLD_SIZE="1",
                LOCAL_RANK="0",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()),
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min), **kwargs)
    return dist.get_rank(), dist.get_world_size()


def shorten_timeout(minutes: float) -> None:
    """After step 1 every rank is past its slow start; a stuck collective should now fail fast
    (docs/launch.md: the flight recorder shows which collective)."""
    try:
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(datetime.timedelta(minutes=minutes), None)
    except (ImportError, RuntimeError, AttributeError):
        pass  # not supported by this backend/version: keep the init timeout


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_if_peers_wait(message: str | None = None, code: int = 1) -> None:
    """Call from an `except` block. With peers, a rank that hit an error must not run the graceful
    tear-down: destroy_process_group can block behind the collective its peers are stuck in, until the
    NCCL timeout. It prints `message` (None: the traceback) and exits with `code` now; torchrun then stops
    the other ranks. Alone, it returns and the caller re-raises."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if message is None:
            traceback.print_exc()
        else:
            sys.stderr.write(message + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
        if message is not None:
            # torchrun stops the other ranks as soon as one exits: a moment's grace lets peers that fail
            # the same (deterministic) check print their own line first.
            time.sleep(PEER_GRACE_S)
        os._exit(code)


def wait_for_peer_reports(world_size: int, timeout_s: float = 30.0) -> bool:
    """Before a rank exits on an error found before the process group exists (CLI parse, dry run): wait
    until every rank has reached the same point, so each prints its own line before torchrun stops the
    slower ones. The ranks meet in torchrun's agent store (it outlives the ranks); without torchrun, or if
    the store cannot be reached, there is nobody to wait for. True when it waited for torchrun peers."""
    if world_size <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return False
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=5),
        )
        key = f"longctx/early_error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        store.add(key, 1)
        deadline = time.monotonic() + timeout_s
        while store.add(key, 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.05)
    except (KeyError, ValueError, RuntimeError, dist.DistError):
        return False
    return True
