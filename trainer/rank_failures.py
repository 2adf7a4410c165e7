"""One report per failure, not one per rank.

A bad data file fails on every rank at once; a path one node cannot read fails on that node only. Either
way the user should read one `error: ...` line, and every rank should exit with the same code. The ranks
agree through the process group's key-value store, not through a collective: a healthy rank may be inside
any collective (or none) when another fails, so a collective "who failed?" could deadlock. Under torchrun
the store is hosted by its agent, so it outlives the ranks that exit; started without torchrun (Slurm's
per-gpu mode) rank 0 hosts it, and once rank 0 has exited the others fall back to reporting for themselves.

- A failing rank records itself and its exit code; the lowest failing rank prints (rank 0 at once, rank r
  after giving ranks < r `GRACE_S` to report), every other one stays quiet.
- The failing ranks wait until all ranks have failed (or `GRACE_S`), then exit without the process-group
  tear-down: a healthy peer may be blocked in a collective it would wait for (as in
  `distributed.exit_if_peers_wait`).
- A healthy rank whose collective then breaks (gloo: the peer closed its socket) sees the recorded failure
  and exits quietly with the same code instead of printing a traceback. Under NCCL a collective waiting
  for a dead peer does not fail quickly; torchrun stops such a rank with SIGTERM when the first rank
  exits (that case is not covered by the CPU tests).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import NoReturn

import torch.distributed as dist

GRACE_S = 10.0
"""How long a failing rank waits for lower ranks (to report instead of it) and for all ranks (to exit together)."""


def _store() -> dist.Store | None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _prefix() -> str:
    # torchrun --max-restarts reuses the agent's store for the next attempt: keep attempts apart.
    return f"longctx/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def _claim_lowest(store: dist.Store, key: str, rank: int) -> int:
    """Lower the stored lowest failing rank to `rank` if it is higher (compare-and-set); returns it."""
    current = store.compare_set(key, "", str(rank)).decode()
    while int(current) > rank:
        swapped = store.compare_set(key, current, str(rank)).decode()
        current = swapped if swapped != current else store.get(key).decode()
    return int(current)


def exit_now(code: int) -> NoReturn:
    # Not sys.exit: interpreter shutdown restores the default SIGTERM action, and torchrun SIGTERMs the
    # ranks still alive when the first one exits, so a slow shutdown would end as "killed by SIGTERM".
    # Nor the process-group tear-down: a peer may be inside a collective that it would wait for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def report_failure(line: str, code: int) -> int:
    """Call on a rank that caught an error the user must see (`line`, printed to stderr). Without peers
    it prints and returns `code`; with peers it prints on one rank only and exits the process with `code`
    once every rank has failed or `GRACE_S` has passed."""
    store = _store()
    if store is None:
        sys.stderr.write(line + "\n")
        return code
    # torchrun SIGTERMs the remaining ranks as soon as the first one exits; a rank that already failed
    # must still exit with the agreed code, not as "killed by SIGTERM".
    signal.signal(signal.SIGTERM, lambda signum, frame: exit_now(code))
    rank, world = dist.get_rank(), dist.get_world_size()
    p = _prefix()
    try:
        store.set(f"{p}code{rank}", str(code))
        lowest = _claim_lowest(store, f"{p}lowest", rank)
        count = store.add(f"{p}count", 1)
        deadline = time.monotonic() + GRACE_S
        while lowest == rank and rank > 0 and count < world and time.monotonic() < deadline:
            time.sleep(0.1)
            lowest, count = int(store.get(f"{p}lowest")), store.add(f"{p}count", 0)
        # "printed" guards against a rank whose error came late, caused by a peer that already exited.
        if lowest == rank and store.compare_set(f"{p}printed", "", str(rank)).decode() == str(rank):
            sys.stderr.write(line + "\n")
        while count < world and time.monotonic() < deadline:
            time.sleep(0.1)
            count = store.add(f"{p}count", 0)
    except (RuntimeError, OSError, ValueError):  # the store is gone (its host exited): over-report
        sys.stderr.write(line + "\n")
    exit_now(code)


def exit_if_a_peer_failed() -> None:
    """Call from an `except` block for an unexpected error: if another rank has already reported a
    failure (which is likely what broke this rank's collective), exit quietly with its code."""
    store = _store()
    if store is None:
        return
    p = _prefix()
    try:
        if not store.check([f"{p}lowest"]):
            return
        code = int(store.get(f"{p}code{int(store.get(f'{p}lowest'))}"))
    except (RuntimeError, OSError, ValueError):
        return
    exit_now(code)
