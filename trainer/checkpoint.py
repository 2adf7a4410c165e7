"""Atomic, sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout of one checkpoint, `<output_dir>/checkpoints/step_<N:08d>/`:
  .metadata, __*_*.distcp   one DCP save of named `Stateful` entries (trainer/checkpoint_state.py):
                            "model", "optim" as each rank's DTensor shards (DCP reshards them on load onto
                            another mesh), "train" (step, scheduler, counters) and "rank" (each rank's
                            data position and RNG states, keyed rank<R>), the last two as JSON tensors
  <engine files>            an engine's own files where it saves model and optimizer itself (DeepSpeed)
  COMPLETE.json             written last by rank 0: step, world size, layout, model config hash, time
A save writes `step_<N>.tmp/`; only after every rank finished does rank 0 write the marker and rename the
directory, so a crash mid-save never leaves something that looks resumable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from trainer.checkpoint_state import (
    CheckpointError,
    JsonState,
    WeightsOnlyLoadPlanner,
    capture_rng_state,
    check_shapes,
    read_legacy,
    restore_rng_state,
    run_entries,
)
from trainer.checkpoint_state import first_line as _first_line

__all__ = [
    "MARKER",
    "Checkpointer",
    "CheckpointError",
    "capture_rng_state",
    "check_writable",
    "restore_rng_state",
]

logger = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
_STEP_DIR = re.compile(r"^step_(\d+)(\.tmp)?$")


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


def rope_of(model_config: Any) -> dict | None:
    """The model's RoPE settings (rope_parameters plus the context length) as plain JSON values, recorded in
    the marker so a resume under other RoPE settings (model.config overrides) is named in the warning."""
    if model_config is None:
        return None
    data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    rope = {
        "rope_parameters": data.get("rope_parameters"),
        "max_position_embeddings": data.get("max_position_embeddings"),
    }
    return json.loads(json.dumps(rope, sort_keys=True, default=str))


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)  # leftover of an interrupted save of this same step
    path.mkdir(parents=True)


class NativeCheckpoint(Protocol):
    """State an engine writes with its own files inside the step directory (DeepSpeed's ZeRO partitions);
    the DCP entries of the same checkpoint hold everything else."""

    def check(self, path: Path, marker: dict) -> None:
        """Raise CheckpointError (one line) if this run cannot load the checkpoint described by `marker`."""

    def save(self, tmp: Path) -> None: ...

    def load(self, path: Path) -> None: ...


class Checkpointer:
    """Saves and resumes the training state under `<output_dir>/checkpoints/`.

    Construct on every rank (save/resume are collective). `layout` (e.g. the mesh dims and the engine) and
    `model_config` are recorded in the completion marker; after a load, `saved_layout` holds the marker of
    the checkpoint that was loaded. `save_state` / `resume` take the named `Stateful` entries of one run;
    `save` / `maybe_resume` build the standard entries from model parts, optimizer, scheduler and a
    per-rank `extra_state` dict.
    """

    def __init__(
        self,
        cfg: Any,
        output_dir: str | os.PathLike,
        *,
        layout: dict | None = None,
        model_config: Any = None,
        native: NativeCheckpoint | None = None,
    ) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.layout = dict(layout or {})
        self.model_hash = config_hash(model_config)
        self.model_rope = rope_of(model_config)
        self.native = native
        self.saved_layout: dict | None = None
        self._pending: tuple[Future, int, Path] | None = None
        self._async_pg = None
        check_writable(self.root)

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

    def find_resume(self) -> Path | None:
        """Collective. The checkpoint `checkpoint.resume` points at, decided by rank 0 for every rank."""
        found: tuple[Path | None, str] = (None, "")
        if _rank() == 0:
            try:
                found = (self._resolve_resume(), "")
            except CheckpointError as exc:
                found = (None, str(exc))
        path, err = _broadcast(found)  # one decision for all ranks, even if their FS views differ
        if err:
            raise CheckpointError(err)
        return path

    def step_of(self, path: Path) -> int:
        """Collective. The step a complete checkpoint holds, from its marker as rank 0 reads it."""
        step = _agreed(
            lambda: int(json.loads((path / MARKER).read_text())["step"]),
            f"checkpoint {path} has no readable {MARKER}",
            rank0_only=True,
        )
        return _broadcast(step)

    # ---- save ------------------------------------------------------------------------------------
    def save_state(self, step: int, entries: dict[str, Any]) -> Path:
        """Collective. Writes step_<N>.tmp, then (after all ranks finish) marks it complete and renames it.

        With async_save (and no engine-native files) the DCP write continues in the background and
        completion happens on the next save or `wait()`. Returns the final directory path."""
        self.wait()
        final = self.root / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        _agreed(lambda: _fresh_dir(tmp), f"cannot create checkpoint dir {tmp}", rank0_only=True)
        try:
            if self.cfg.async_save and self.native is None:
                if self._async_pg is None and dist.is_initialized():
                    # A separate gloo group keeps the background thread's collectives off the training group.
                    self._async_pg = dist.new_group(backend="gloo")
                fut = dcp.async_save(entries, checkpoint_id=str(tmp), process_group=self._async_pg)
                self._pending = (getattr(fut, "upload_completion", fut), step, tmp)
                return final
            dcp.save(entries, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        except Exception as exc:  # noqa: BLE001 - DCP gathers errors from all ranks
            raise CheckpointError(f"saving checkpoint {tmp} failed: {_first_line(exc)}") from None
        if self.native is not None:
            _agreed(lambda: self.native.save(tmp), f"saving checkpoint {tmp} failed")
        self._finalize(step, tmp)
        return final

    def save(
        self,
        step: int,
        model_parts: list[nn.Module],
        optimizer: Any,
        scheduler: Any,
        extra_state: dict | None = None,
    ) -> Path:
        """Collective. `save_state` of the standard entries; `extra_state` is this rank's own dict."""
        entries = run_entries(model_parts, optimizer, scheduler, lambda: step, lambda: extra_state or {})
        return self.save_state(step, entries)

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
            "rope": self.model_rope,
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
    def resume(self, entries: dict[str, Any]) -> int | None:
        """Collective. Load per `checkpoint.resume` into `entries`; returns the step, or None (fresh)."""
        path = self.find_resume()
        return None if path is None else self.load_state(path, entries)

    def maybe_resume(
        self, model_parts: list[nn.Module], optimizer: Any, scheduler: Any
    ) -> tuple[int, dict] | None:
        """Collective. `resume` of the standard entries; returns (step, extra_state) or None. extra_state
        is this rank's own when the world size is unchanged, else rank 0's."""
        got: dict = {}
        step = self.resume(run_entries(model_parts, optimizer, scheduler, lambda: 0, dict, got.update))
        return None if step is None else (step, got)

    def _marker(self, path: Path) -> dict:
        try:
            marker = json.loads((path / MARKER).read_text())
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint {path} has no readable {MARKER} ({_first_line(exc)})"
            ) from None
        saved, mine = marker.get("layout", {}).get("engine", "fsdp2"), self.layout.get("engine", "fsdp2")
        if saved != mine:
            raise CheckpointError(
                f"checkpoint {path} was written by the {saved} engine; this run uses {mine}: resume with "
                f"parallel.engine={saved}, or start fresh with checkpoint.resume=none"
            )
        if self.model_hash and marker.get("model_config_hash") not in (None, self.model_hash):
            logger.warning("checkpoint %s was saved with a different model config (hash differs)", path)
        if self.model_rope and marker.get("rope") not in (None, self.model_rope):
            logger.warning(
                "checkpoint %s was trained with RoPE %s; this run uses %s (model.config overrides)",
                path,
                marker["rope"],
                self.model_rope,
            )
        return marker

    def load_state(self, path: str | os.PathLike, entries: dict[str, Any]) -> int:
        """Collective. Load a complete checkpoint directory into `entries` (DCP reshards the sharded ones
        onto the current mesh); returns its step."""
        path = Path(path)
        marker = self._marker(path)
        if self.native is not None:
            self.native.check(path, marker)
        try:
            saved_md = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {path} is corrupt or incomplete: {_first_line(exc)}") from None
        same_world = marker.get("world_size") == _world()
        legacy = None if "train.json" in saved_md else read_legacy(path, same_world)
        state: dict[str, Any] = {}
        for name, entry in entries.items():
            if not isinstance(entry, JsonState):
                state[name] = entry.state_dict()
            elif legacy is None:
                target = entry.template(name, saved_md, same_world)
                if target is None:
                    raise CheckpointError(f"checkpoint {path} has no '{name}' state (saved by another run?)")
                state[name] = target
        check_shapes(path, state, saved_md)
        flat = {f"{name}.{key}": value for name, values in state.items() for key, value in values.items()}
        try:
            dcp.load(
                flat,
                checkpoint_id=str(path),
                planner=WeightsOnlyLoadPlanner(flatten_state_dict=False),
                no_dist=not dist.is_initialized(),
            )
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"loading checkpoint {path} failed: {_first_line(exc)}") from None
        state = {name: {key: flat[f"{name}.{key}"] for key in values} for name, values in state.items()}
        if self.native is not None:
            _agreed(lambda: self.native.load(path), f"loading checkpoint {path} failed")
        self.saved_layout = marker  # entries may look at the saved layout (is this rank's RNG state its own?)
        for name, entry in entries.items():
            if name in state:
                entry.load_state_dict(state[name])
            else:
                entry.put(legacy[name])
        logger.info(
            "resumed from %s (step %d, saved on %s ranks)", path, marker["step"], marker["world_size"]
        )
        return int(marker["step"])
