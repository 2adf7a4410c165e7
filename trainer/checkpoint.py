"""Atomic, sharded checkpoints with torch.distributed.checkpoint (DCP), and HF safetensors export.

Layout of one checkpoint, `<output_dir>/checkpoints/step_<N:08d>/`:
  .metadata, __*_*.distcp   DCP shards: {"model": ..., "optim": ...} as each rank's DTensor shards, so a
                            checkpoint loads onto another mesh (DCP reshards on load)
  train_state.pt            rank 0: global non-sharded state (scheduler state dicts, step)
  extra_rank<R>.pt          each rank: its `extra_state` (dataloader state, RNG states, counters)
  COMPLETE.json             written last by rank 0: step, world size, layout, model config hash, time
A save writes `step_<N>.tmp/`; only after every rank finished does rank 0 write the marker and rename the
directory, so a crash mid-save never leaves something that looks resumable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

logger = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
TRAIN_STATE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)(\.tmp)?$")
# Flat optimizer keys ("state.<fqn>.exp_avg") merge cleanly across pipeline stages and do not depend on
# parameter order, which is what lets an optimizer state follow a change of layout.
_SD_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message is one line naming the path."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """True iff every rank reports ok, so a local failure turns into a collective one (no hang)."""
    if not dist.is_initialized():
        return ok
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if ok else 0], device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _agreed(fn: Any, what: str, rank0_only: bool = False) -> Any:
    """Run fn (on rank 0 only, or everywhere); a failure anywhere raises CheckpointError on every rank."""
    ok, err, result = True, "failed on another rank", None
    if not rank0_only or _rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - reported collectively, as one line
            ok, err = False, _first_line(exc)
    if not _all_ok(ok):
        raise CheckpointError(f"{what}: {err}")
    return result


def _all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_writable(output_dir: str | os.PathLike) -> None:
    """Fail early, with one line, when output_dir cannot be created or written."""
    path = Path(output_dir)
    probe = path / f".write_probe_{os.getpid()}_{_rank()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"output_dir {path} is not writable ({_first_line(exc)})") from None


def config_hash(model_config: Any) -> str | None:
    """Stable short hash of a model config (HF config object or dict) to recognise foreign checkpoints."""
    if model_config is None:
        return None
    data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and the current CUDA device, for `extra_state`."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`; a missing CUDA entry (checkpoint from CPU) is ignored."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _optimizers(optimizer: Any, n_parts: int) -> list[torch.optim.Optimizer]:
    if isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizers"):
        optimizer = optimizer.optimizers  # a container holding one optimizer per model part
    opts = list(optimizer) if isinstance(optimizer, Sequence) else [optimizer]
    if len(opts) != n_parts:
        raise CheckpointError(
            f"got {len(opts)} optimizer(s) for {n_parts} model part(s); pass one optimizer per model part"
        )
    return opts


def _part_states(parts: list[nn.Module], opts: list[torch.optim.Optimizer]) -> list[tuple[dict, dict]]:
    return [
        (get_model_state_dict(p, options=_SD_OPTS), get_optimizer_state_dict(p, o, options=_SD_OPTS))
        for p, o in zip(parts, opts)
    ]


def _schedulers(scheduler: Any) -> list[Any]:
    return [s for s in (scheduler if isinstance(scheduler, Sequence) else [scheduler]) if s is not None]


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)  # leftover of an interrupted save of this same step
    path.mkdir(parents=True)


def _merged(states: list[tuple[dict, dict]]) -> dict[str, dict]:
    model: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    for msd, osd in states:
        model.update(msd)
        optim.update(osd)
    return {"model": model, "optim": optim}


class Checkpointer:
    """Saves and resumes the training state under `<output_dir>/checkpoints/`.

    Construct on every rank (save/resume are collective). `layout` (e.g. the mesh dims) and
    `model_config` are recorded in the completion marker; after `maybe_resume`, `saved_layout` holds
    the marker of the checkpoint that was loaded so the trainer can decide whether data state can follow.
    """

    def __init__(
        self, cfg: Any, output_dir: str | os.PathLike, *, layout: dict | None = None, model_config: Any = None
    ) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.layout = dict(layout or {})
        self.model_hash = config_hash(model_config)
        self.saved_layout: dict | None = None
        self._pending: tuple[Future, int, Path] | None = None
        self._async_pg = None
        check_writable(self.root)

    def due(self, step: int, total_steps: int) -> bool:
        """Whether `step` should be saved: every `interval` steps, and always the last one."""
        return step == total_steps or (self.cfg.interval > 0 and step % self.cfg.interval == 0)

    # ---- discovery -------------------------------------------------------------------------------
    def list_checkpoints(self) -> tuple[list[tuple[int, Path]], list[Path]]:
        """(complete checkpoints sorted by step, directories without a completion marker)."""
        complete, partial = [], []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                m = _STEP_DIR.match(entry.name)
                if not m or not entry.is_dir():
                    continue
                if m.group(2) is None and (entry / MARKER).is_file():
                    complete.append((int(m.group(1)), entry))
                else:
                    partial.append(entry)
        return sorted(complete), sorted(partial)

    def _resolve_resume(self) -> Path | None:
        mode = str(self.cfg.resume)
        if mode == "none":
            return None
        if mode != "auto":
            path = Path(mode)
            if not path.is_dir():
                raise CheckpointError(f"checkpoint.resume: {path} does not exist or is not a directory")
            if not (path / MARKER).is_file():
                raise CheckpointError(
                    f"checkpoint.resume: {path} is incomplete (no {MARKER}); refusing to load it"
                )
            return path
        complete, partial = self.list_checkpoints()
        newest = complete[-1][0] if complete else -1
        for p in partial:
            m = _STEP_DIR.match(p.name)
            if m and int(m.group(1)) >= newest:
                logger.warning("ignoring incomplete checkpoint %s (no %s): an interrupted save", p, MARKER)
        return complete[-1][1] if complete else None

    # ---- save ------------------------------------------------------------------------------------
    @staticmethod
    def write_local_state(tmp: Path, step: int, scheduler: Any, extra_state: dict | None) -> None:
        """Collective. Each rank's extra state, and rank 0's step + scheduler state, into `tmp`."""

        def write_local() -> None:
            torch.save(extra_state or {}, tmp / f"extra_rank{_rank()}.pt")
            if _rank() == 0:
                scheds = [s.state_dict() for s in _schedulers(scheduler)]
                torch.save({"step": step, "schedulers": scheds}, tmp / TRAIN_STATE)

        _agreed(write_local, f"saving checkpoint {tmp} failed")

    def save(
        self,
        step: int,
        model_parts: list[nn.Module],
        optimizer: Any,
        scheduler: Any,
        extra_state: dict | None = None,
    ) -> Path:
        """Collective. Writes step_<N>.tmp, then (after all ranks finish) marks it complete and renames it.

        With async_save the DCP write continues in the background and completion happens on the next
        `save` or `wait()`. Returns the final directory path.
        """
        self.wait()
        final = self.root / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        _agreed(lambda: _fresh_dir(tmp), f"cannot create checkpoint dir {tmp}", rank0_only=True)
        parts = list(model_parts)
        state = _merged(_part_states(parts, _optimizers(optimizer, len(parts))))

        self.write_local_state(tmp, step, scheduler, extra_state)
        try:
            if self.cfg.async_save:
                if self._async_pg is None and dist.is_initialized():
                    # A separate gloo group keeps the background thread's collectives off the training group.
                    self._async_pg = dist.new_group(backend="gloo")
                fut = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_pg)
                self._pending = (getattr(fut, "upload_completion", fut), step, tmp)
                return final
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        except Exception as exc:  # noqa: BLE001 - DCP gathers errors from all ranks
            raise CheckpointError(f"saving checkpoint {tmp} failed: {_first_line(exc)}") from None
        self._finalize(step, tmp)
        return final

    def wait(self) -> None:
        """Block until a pending async save is written and marked complete (call at exit)."""
        if self._pending is None:
            return
        fut, step, tmp = self._pending
        self._pending = None
        _agreed(fut.result, f"async save of checkpoint {tmp} failed")
        self._finalize(step, tmp)

    close = wait

    def _finalize(self, step: int, tmp: Path) -> None:
        _barrier()  # every rank's shards are on disk before the marker claims completeness
        _agreed(
            lambda: self._mark_and_rename(step, tmp), f"finishing checkpoint {tmp} failed", rank0_only=True
        )
        if _rank() == 0:
            self._rotate()
        logger.info("saved checkpoint step %d to %s", step, tmp.with_suffix(""))

    def _mark_and_rename(self, step: int, tmp: Path) -> None:
        marker = {
            "step": step,
            "world_size": _world(),
            "layout": self.layout,
            "model_config_hash": self.model_hash,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / (MARKER + ".part")).write_text(json.dumps(marker, indent=2))
        os.replace(tmp / (MARKER + ".part"), tmp / MARKER)
        final = tmp.with_suffix("")
        old = final.with_name(final.name + ".old")
        if final.exists():  # same step saved again: swap so a complete copy exists at every moment
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)

    def _rotate(self) -> None:
        complete, partial = self.list_checkpoints()
        if self.cfg.keep > 0:
            for _, path in complete[: -self.cfg.keep]:
                shutil.rmtree(path, ignore_errors=True)
        newest = complete[-1][0] if complete else -1
        for path in partial:  # interrupted saves older than the newest complete one are garbage
            m = _STEP_DIR.match(path.name)
            if m and m.group(2) and int(m.group(1)) < newest:
                shutil.rmtree(path, ignore_errors=True)

    # ---- resume ----------------------------------------------------------------------------------
    def maybe_resume(
        self, model_parts: list[nn.Module], optimizer: Any, scheduler: Any
    ) -> tuple[int, dict] | None:
        """Collective. Load per `checkpoint.resume`; returns (step, extra_state) or None (fresh start).

        extra_state is this rank's own when the world size is unchanged, else rank 0's (compare
        `saved_layout` with the current layout to decide what of it still applies).
        """
        found: tuple[Path | None, str] = (None, "")
        if _rank() == 0:
            try:
                found = (self._resolve_resume(), "")
            except CheckpointError as exc:
                found = (None, str(exc))
        path, err = _broadcast(found)  # one decision for all ranks, even if their FS views differ
        if err:
            raise CheckpointError(err)
        if path is None:
            return None
        return self.load(path, model_parts, optimizer, scheduler)

    def load(
        self, path: str | os.PathLike, model_parts: list[nn.Module], optimizer: Any, scheduler: Any
    ) -> tuple[int, dict]:
        """Collective. Load a complete checkpoint directory into the given (possibly resharded) objects."""
        path = Path(path)
        try:
            marker = json.loads((path / MARKER).read_text())
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint {path} has no readable {MARKER} ({_first_line(exc)})"
            ) from None
        saved_engine = marker.get("layout", {}).get("engine", "fsdp2")
        if saved_engine != self.layout.get("engine", "fsdp2"):
            raise CheckpointError(
                f"checkpoint {path} was written by the {saved_engine} engine; this run uses "
                f"{self.layout.get('engine', 'fsdp2')} (parallel.engine)"
            )
        try:
            train_state = torch.load(path / TRAIN_STATE, weights_only=False)
            saved_md = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {path} is corrupt or incomplete: {_first_line(exc)}") from None
        if self.model_hash and marker.get("model_config_hash") not in (None, self.model_hash):
            logger.warning("checkpoint %s was saved with a different model config (hash differs)", path)
        parts = list(model_parts)
        opts = _optimizers(optimizer, len(parts))
        states = _part_states(parts, opts)
        state = _merged(states)
        _check_shapes(path, state, saved_md)
        try:
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"loading checkpoint {path} failed: {_first_line(exc)}") from None
        for part, opt, (msd, osd) in zip(parts, opts, states):
            set_model_state_dict(part, {k: state["model"][k] for k in msd}, options=_SD_OPTS)
            set_optimizer_state_dict(part, opt, {k: state["optim"][k] for k in osd}, options=_SD_OPTS)
        for sched, sd in zip(_schedulers(scheduler), train_state["schedulers"]):
            sched.load_state_dict(sd)
        same_world = marker.get("world_size") == _world()
        extra_file = path / f"extra_rank{_rank() if same_world else 0}.pt"
        try:
            extra = torch.load(extra_file, weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint {path}: cannot read {extra_file.name}: {_first_line(exc)}"
            ) from None
        self.saved_layout = marker
        logger.info(
            "resumed from %s (step %d, saved on %s ranks)", path, marker["step"], marker["world_size"]
        )
        return int(marker["step"]), extra


def _check_shapes(path: Path, state: dict[str, dict], saved_md: dict) -> None:
    """Name the first key that is missing or has another global shape (DCP's own error is vaguer)."""
    for section in ("model", "optim"):
        for key, value in state[section].items():
            if not isinstance(value, torch.Tensor):
                continue
            saved = saved_md.get(f"{section}.{key}")
            if saved is None:
                raise CheckpointError(
                    f"checkpoint {path} has no entry for '{key}' (saved from another model?)"
                )
            if isinstance(saved, TensorStorageMetadata) and tuple(saved.size) != tuple(value.shape):
                raise CheckpointError(
                    f"checkpoint {path} does not match the model: '{key}' is {list(saved.size)} in the "
                    f"checkpoint but {list(value.shape)} in the model"
                )


# ---- Hugging Face export ---------------------------------------------------------------------------
