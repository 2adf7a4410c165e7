"""Python logging for a distributed run: rank-0 console, one log file per rank."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

_MARK = "_longctx_handler"  # tags our handlers so a second setup_logging call replaces, not duplicates


class _ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm when a progress bar may be on screen, so log lines do not tear the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise into the training loop
            self.handleError(record)


def setup_logging(output_dir: str | os.PathLike, rank: int, level: int = logging.INFO) -> Path:
    """Configure the root logger: `<output_dir>/logs/rank<R>.log` on every rank, console on rank 0.

    Other ranks print only errors to stderr (prefixed with their rank) so a failure on any rank is
    visible without every rank repeating rank 0's lines. Returns the rank's log file path.
    """
    log_dir = Path(output_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"rank{rank}.log"
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _MARK, False):
            root.removeHandler(h)
            h.close()
    root.setLevel(level)

    file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    file_handler.setFormatter(
        logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    )
    console = _ConsoleHandler(sys.stdout if rank == 0 else sys.stderr)
    console.setLevel(level if rank == 0 else logging.ERROR)
    prefix = "" if rank == 0 else f"[rank{rank}] "
    console.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
    for h in (file_handler, console):
        setattr(h, _MARK, True)
        root.addHandler(h)
    logging.captureWarnings(True)
    return path
