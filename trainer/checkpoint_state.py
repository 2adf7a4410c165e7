"""The `Stateful` entries of one DCP checkpoint: model, optimizer, and small JSON state (step, scheduler,
counters; per rank: data position, RNG states).

Small state is stored as one uint8 tensor of UTF-8 JSON per entry, so resuming never unpickles anything:
DCP reads tensors with `weights_only` semantics, and JSON needs no trust. An entry that cannot follow a
change of world size (RNG streams, a streaming loader's shard) is per rank, keyed `rank<R>`; with another
world size every rank loads rank 0's (as the loader's own `load_state_dict` then decides what applies).
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

# Flat optimizer keys ("state.<fqn>.exp_avg") merge cleanly across pipeline stages and do not depend on
# parameter order, which is what lets an optimizer state follow a change of layout.
SD_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)
# A part with frozen parameters (LoRA's base) saves only what trains: the frozen weights are rebuilt from
# model.path, and loading (strict=False) leaves them as they are.
TRAINED_OPTS = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True, strict=False)


def sd_options(part: nn.Module) -> StateDictOptions:
    return SD_OPTS if all(p.requires_grad for p in part.parameters()) else TRAINED_OPTS


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message is one line naming the path."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# ---- JSON with tensors and numpy arrays ---------------------------------------------------------------
def _default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {
            "__tensor__": base64.b64encode(raw).decode(),
            "dtype": str(t.dtype)[6:],
            "shape": list(t.shape),
        }
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not checkpointable as JSON")


def _hook(d: dict) -> Any:
    if "__tensor__" not in d:
        return d
    raw = bytearray(base64.b64decode(d["__tensor__"]))
    t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return t.view(getattr(torch, d["dtype"])).reshape(d["shape"]).clone()


def encode(obj: Any) -> torch.Tensor:
    """A JSON-able value (tensors and numpy arrays allowed; tuples come back as lists) as a uint8 tensor."""
    data = json.dumps(obj, default=_default, sort_keys=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode(t: torch.Tensor) -> Any:
    return json.loads(t.numpy().tobytes().decode(), object_hook=_hook)


# ---- RNG -----------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and the current CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`, also after a JSON round trip (tuples as lists); a missing CUDA entry
    (checkpoint from CPU) is ignored."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- entries --------------------------------------------------------------------------------------------
class JsonState(Stateful):
    """A dict produced by `get` at save and handed to `put` at load, as one JSON tensor; `per_rank` keys it
    by rank. DCP loads into a tensor of the saved size, which `template` takes from the metadata."""

    def __init__(self, get: Callable[[], dict], put: Callable[[dict], None], per_rank: bool = False) -> None:
        self.get, self.put, self.per_rank = get, put, per_rank
        self._load_key: str | None = None

    def _key(self, rank: int) -> str:
        return f"rank{rank}" if self.per_rank else "json"

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {self._key(_rank()): encode(self.get())}

    def template(self, name: str, metadata: dict, same_world: bool) -> dict[str, torch.Tensor] | None:
        """The load target (None when the checkpoint has no such entry)."""
        self._load_key = self._key(_rank() if same_world else 0)
        saved = metadata.get(f"{name}.{self._load_key}")
        return None if saved is None else {self._load_key: torch.empty(tuple(saved.size), dtype=torch.uint8)}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.put(decode(state_dict[self._load_key or self._key(_rank())]))


def _optimizers(optimizer: Any, n_parts: int) -> list[torch.optim.Optimizer]:
    if isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizers"):
        optimizer = optimizer.optimizers  # a container holding one optimizer per model part
    opts = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if len(opts) != n_parts:
        raise CheckpointError(
            f"got {len(opts)} optimizer(s) for {n_parts} model part(s); pass one optimizer per model part"
        )
    return opts


class ModelState(Stateful):
    """The weights of every model part (pipeline stages a rank holds) under plain HF FQNs, as DTensor
    shards: DCP reshards them onto another mesh on load."""

    def __init__(self, parts: list[nn.Module]) -> None:
        self.parts = list(parts)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for p in self.parts for k, v in get_model_state_dict(p, options=sd_options(p)).items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self.parts:
            opts = sd_options(part)
            keys = get_model_state_dict(part, options=opts).keys()
            set_model_state_dict(part, {k: state_dict[k] for k in keys}, options=opts)


class OptimizerState(Stateful):
    """The optimizer state of every model part, with flat keys (see SD_OPTS)."""

    def __init__(self, parts: list[nn.Module], optimizer: Any) -> None:
        self.parts = list(parts)
        self.opts = _optimizers(optimizer, len(self.parts))

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part, opt in zip(self.parts, self.opts):
            out.update(get_optimizer_state_dict(part, opt, options=sd_options(part)))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, opt in zip(self.parts, self.opts):
            opts = sd_options(part)
            keys = get_optimizer_state_dict(part, opt, options=opts).keys()
            set_optimizer_state_dict(part, opt, {k: state_dict[k] for k in keys}, options=opts)


def schedulers_of(scheduler: Any) -> list[Any]:
    return [s for s in (scheduler if isinstance(scheduler, (list, tuple)) else [scheduler]) if s is not None]


def run_entries(
    model_parts: list[nn.Module],
    optimizer: Any,
    scheduler: Any,
    step: Callable[[], int],
    rank_get: Callable[[], dict],
    rank_put: Callable[[dict], None] | None = None,
) -> dict[str, Stateful]:
    """The standard entries: model, optimizer (omitted when None), "train" (step and scheduler) and "rank"
    (a per-rank dict from `rank_get`, handed to `rank_put` on load)."""
    entries: dict[str, Stateful] = {"model": ModelState(model_parts)}
    if optimizer is not None:
        entries["optim"] = OptimizerState(model_parts, optimizer)
    entries["train"] = train_state(step, scheduler)
    entries["rank"] = JsonState(rank_get, rank_put or (lambda sd: None), per_rank=True)
    return entries


def train_state(
    step: Callable[[], int],
    scheduler: Any,
    counters: Callable[[], dict] | None = None,
    restore: Callable[[dict], None] | None = None,
) -> JsonState:
    """The run-global entry: step, scheduler state dicts and counters (identical on every rank)."""
    scheds = schedulers_of(scheduler)

    def get() -> dict:
        return {
            "step": step(),
            "schedulers": [s.state_dict() for s in scheds],
            **(counters() if counters else {}),
        }

    def put(sd: dict) -> None:
        for sched, s in zip(scheds, sd["schedulers"]):
            sched.load_state_dict(s)
        if restore is not None:
            restore(sd)

    return JsonState(get, put)


# ---- loading ----------------------------------------------------------------------------------------------
def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# Files of checkpoints written before the small state moved into the DCP save (read without unpickling
# code: weights_only, with numpy's RNG array allowed).
_LEGACY_TRAIN, _LEGACY_RANK = "train_state.pt", "extra_rank{}.pt"


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP stores non-tensor leaves (the optimizer's hyper-parameters) as pickles and reads them back
    unrestricted; these are plain numbers and tuples, so read them as weights only. Entries are flattened
    by the caller (one level: "<entry>.<key>", as DCP's own flattening names them on save)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # original_state_dict: the caller's dict (the planner's own may be a copy with sharded tensors split)
        self.original_state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


def read_legacy(path: Path, same_world: bool) -> dict[str, dict]:
    """The "train" and "rank" entries of a checkpoint written before they moved into the DCP save: rank 0's
    train_state.pt (step, schedulers) and extra_rank<R>.pt (data, RNG, counters), read as weights only."""
    from numpy._core.multiarray import _reconstruct

    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    files = [path / _LEGACY_TRAIN, path / _LEGACY_RANK.format(_rank() if same_world else 0)]
    loaded = []
    for file in files:
        try:
            with torch.serialization.safe_globals(allowed):
                loaded.append(torch.load(file, weights_only=True))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint {path}: cannot read {file.name} (the older checkpoint layout): {first_line(exc)}"
            ) from None
    train, extra = loaded
    return {"train": {**extra, **train}, "rank": extra}


def check_shapes(path: Path, state: dict[str, dict], saved_md: dict) -> None:
    """Name the first key that is missing or has another global shape (DCP's own error is vaguer)."""
    for section, values in state.items():
        for key, value in values.items():
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
