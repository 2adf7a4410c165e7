"""Export a (sharded) model to a Hugging Face directory: sharded safetensors + index + config + tokenizer,
streamed tensor by tensor.

Every rank knows every tensor's name, shape and dtype up front (one all-gather of the names and global
shapes), so all ranks compute the same file plan: the tensors of each pipeline stage packed in order into
files of at most `shard_bytes`, each file written by one rank of that stage (round robin, so several ranks
write at once). A file's safetensors header (offsets included) is written first; then each tensor is gathered
(`DTensor.full_tensor`, a collective over its own mesh), appended to its file by that file's writer and freed,
so no rank holds more than its own shards plus one full tensor.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from trainer.checkpoint import CheckpointError, _agreed, _all_gather, _all_ok, _barrier, _first_line, _rank

logger = logging.getLogger(__name__)

SHARD_BYTES = 5 * 2**30  # the file size transformers' save_pretrained uses by default
_SAFE_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
}


@dataclass
class FilePlan:
    name: str
    writer: int  # the global rank that writes it
    keys: list[str] = field(default_factory=list)
    size: int = 0


def plan_files(
    holders: dict[str, list[int]],
    shapes: dict[str, tuple[int, ...]],
    order: list[str],
    itemsize: int,
    shard_bytes: int,
) -> tuple[list[FilePlan], dict[str, FilePlan]]:
    """Pack the tensors of each group of ranks holding the same keys (a pipeline stage) into files in
    `order`; file i of a group is written by its (i mod group size)-th rank. Same result on every rank."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for key in order:
        groups.setdefault(tuple(holders[key]), []).append(key)
    files: list[FilePlan] = []
    for ranks, keys in sorted(groups.items()):
        first = len(files)
        for key in keys:
            nbytes = torch.Size(shapes[key]).numel() * itemsize
            if len(files) == first or (files[-1].size + nbytes > shard_bytes and files[-1].keys):
                files.append(FilePlan("", ranks[(len(files) - first) % len(ranks)]))
            files[-1].keys.append(key)
            files[-1].size += nbytes
    for i, f in enumerate(files):
        f.name = (
            "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        )
    return files, {k: f for f in files for k in f.keys}


class _StreamWriter:
    """One safetensors file written front to back: the header from the known shapes, then each tensor."""

    def __init__(self, path: Path, keys: list[str], shapes: dict, dtype: torch.dtype) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset, item = 0, dtype.itemsize
        for key in keys:
            n = torch.Size(shapes[key]).numel() * item
            header[key] = {
                "dtype": _SAFE_DTYPES[dtype],
                "shape": list(shapes[key]),
                "data_offsets": [offset, offset + n],
            }
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.f: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.f.write(len(raw).to_bytes(8, "little") + raw)
        self.pending = list(keys)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if not self.pending or self.pending[0] != key:
            raise RuntimeError(f"export out of order: {key} (expected {self.pending[:1]})")
        self.pending.pop(0)
        self.f.write(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy())  # no bytes copy
        if not self.pending:
            self.close()

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


def write_streamed(
    out: Path,
    local_keys: list[str],
    shape_of: Callable[[str], tuple[int, ...]],
    tensors: Iterable[tuple[str, Callable[[], torch.Tensor | None]]],
    dtype: torch.dtype,
    shard_bytes: int = SHARD_BYTES,
) -> dict[str, str]:
    """Collective. Stream `tensors` ((key, thunk) in `local_keys` order; every holder of a key calls its thunk,
    which may be a collective and returns the full tensor) into sharded safetensors under `out`, plus the
    index when there is more than one file. Returns the weight map (key -> file)."""
    rank = _rank()
    gathered = _all_gather([(k, tuple(shape_of(k))) for k in local_keys])
    holders: dict[str, list[int]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []
    for r, entries in enumerate(gathered):
        for key, shape in entries:
            if key not in holders:
                order.append(key)
            holders.setdefault(key, []).append(r)
            shapes[key] = shape
    files, file_of = plan_files(holders, shapes, order, dtype.itemsize, shard_bytes)
    writers: dict[str, _StreamWriter] = {}
    ok, err = True, "failed on another rank"
    try:
        for f in files:
            if f.writer == rank:
                writers[f.name] = _StreamWriter(out / f.name, f.keys, shapes, dtype)
    except Exception as exc:  # noqa: BLE001 - reported collectively below
        ok, err = False, _first_line(exc)
    for key, thunk in tensors:
        full = thunk()  # every holder joins the gather, writer or not
        plan = file_of[key]
        if ok and plan.writer == rank:
            try:
                writers[plan.name].write(key, full.to(dtype))
            except Exception as exc:  # noqa: BLE001
                ok, err = False, _first_line(exc)
        del full
    for w in writers.values():
        w.close()
    if not _all_ok(ok):
        raise CheckpointError(f"HF export to {out} failed: {err}")
    weight_map = {k: f.name for f in files for k in f.keys}
    if rank == 0 and len(files) > 1:
        total = sum(f.size for f in files)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return weight_map


def save_config_and_tokenizer(out: Path, hf_model_config: Any, tokenizer: Any, dt: torch.dtype) -> None:
    cfg = hf_model_config.__class__.from_dict(hf_model_config.to_dict())
    cfg.dtype = dt
    cfg.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def export_hf(
    model_parts: list[nn.Module],
    hf_model_config: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype = "bfloat16",
    state_dicts: list[Mapping[str, torch.Tensor]] | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Collective. Write a `from_pretrained`-loadable directory (sharded safetensors + index + config +
    tokenizer) from an FSDP2 / TP / PP model, one tensor at a time (see the module docstring).
    `state_dicts` (one per part, HF names) replaces the parts' own state dicts, e.g. LoRA weights merged
    into the base."""
    out = Path(out_dir)
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tied = bool(getattr(hf_model_config, "tie_word_embeddings", False))
    sds = state_dicts if state_dicts is not None else [get_model_state_dict(p) for p in model_parts]
    values = {k: v for sd in sds for k, v in sd.items() if not (tied and k == "lm_head.weight")}

    def gather(value: torch.Tensor) -> Callable[[], torch.Tensor]:
        # cast before gathering: the traffic and the transient full tensor are in the export dtype
        return lambda: value.to(dt).full_tensor() if hasattr(value, "full_tensor") else value.to(dt)

    _agreed(
        lambda: out.mkdir(parents=True, exist_ok=True), f"cannot create HF export dir {out}", rank0_only=True
    )
    write_streamed(
        out,
        list(values),
        lambda k: values[k].shape,
        ((k, gather(v)) for k, v in values.items()),
        dt,
        shard_bytes,
    )
    if _rank() == 0:
        save_config_and_tokenizer(out, hf_model_config, tokenizer, dt)
        logger.info("exported HF model (%s) to %s", dt, out)
    _barrier()
    return out
