"""Signals that stop a run: save after the current step, then exit cleanly.

SIGTERM (schedulers, `kill`), SIGUSR1 (Slurm's warning before the time limit) and the first SIGINT
(Ctrl-C) set a flag that the loop reads after each step; ranks agree on it so they all leave at the same
step. A second Ctrl-C aborts at once without saving. Ctrl-C reaches every process of the terminal's group,
and torchrun forwards its own copy to each rank too, so SIGINTs within `SAME_PRESS_S` of the first count
as the same press.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

log = logging.getLogger("longctx")

SAVE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SAME_PRESS_S = 1.0
ABORT_EXIT_CODE = 130  # the shell's code for "ended by SIGINT"


class StopSignal:
    """Installs the handlers; `received` is the first stopping signal, `agreed` the collective check."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.received: int | None = None
        self._first_sigint: float | None = None
        for sig in SAVE_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > SAME_PRESS_S:
                self._abort()
            if self._first_sigint is None:
                self._first_sigint = now
                if self.rank == 0:
                    sys.stderr.write("Ctrl-C: saving after the current step (press Ctrl-C again to abort)\n")
        if self.received is None:
            self.received = signum

    def _abort(self) -> None:
        if self.rank == 0:
            sys.stderr.write("Ctrl-C again: aborting without saving\n")
        sys.stderr.flush()
        # Peers may be inside a collective with this rank: no graceful tear-down, which could block.
        os._exit(ABORT_EXIT_CODE)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "none"

    def agreed(self, device: torch.device) -> bool:
        """Collective: stop if any rank got a signal (ranks must leave the loop at the same step)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def exit_interrupted() -> None:
    """Call from `except KeyboardInterrupt`: Ctrl-C before the loop installed its handlers (model or data
    still loading). One line, no traceback, no tear-down that could wait on peers."""
    if os.environ.get("RANK", "0") == "0":
        sys.stderr.write("interrupted before training started: nothing saved\n")
    sys.stderr.flush()
    os._exit(ABORT_EXIT_CODE)
