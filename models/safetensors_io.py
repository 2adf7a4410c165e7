"""Read slices of tensors from HF safetensors files with plain file reads (no mmap, no whole tensor).

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range) and the
raw row-major data. A slice along dim 0 is one contiguous byte range; a slice along later dims (a
row-wise TP shard) is read in row blocks of at most `BLOCK_BYTES`, so a reader holds at most one block
besides its destination. Plain reads, rather than the mmap that `safe_open` uses, keep the touched file
pages out of the process' resident memory: the page cache is shared and reclaimable, an mmap's pages
count against every rank that touched them.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

BLOCK_BYTES = 64 * 2**20
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the tensor's data in `file`


def _read_header(file: Path) -> dict[str, Entry]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{file.name}: tensor {key} has unsupported dtype {info['dtype']}")
        entries[key] = Entry(
            file, DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + info["data_offsets"][0]
        )
    return entries


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF model directory: those the index names, else `model.safetensors`,
    else every `*.safetensors` (some repos also ship a differently named consolidated copy: the index wins)."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    return sorted(d.glob("*.safetensors"))


class SafetensorsCheckpoint:
    """The tensors of one HF model directory, by name; `read` copies a slice into a destination tensor."""

    def __init__(self, directory: str | os.PathLike):
        files = checkpoint_files(directory)
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {directory}")
        self.entries: dict[str, Entry] = {}
        for file in files:
            self.entries.update(_read_header(file))

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def largest_bytes(self) -> int:
        return max((torch.Size(e.shape).numel() * e.dtype.itemsize for e in self.entries.values()), default=0)

    def read(self, key: str, offsets: tuple[int, ...], out: torch.Tensor) -> None:
        """Fill `out` (any dtype and device) with the block of tensor `key` that starts at `offsets` and has
        `out`'s shape."""
        e = self.entries[key]
        shape = e.shape
        if len(offsets) != len(shape) or out.dim() != len(shape):
            raise ValueError(f"{key}: slice of rank {out.dim()} for a tensor of shape {shape}")
        if any(o + s > d for o, s, d in zip(offsets, out.shape, shape)):
            raise ValueError(f"{key}: slice {tuple(out.shape)} at {offsets} exceeds the saved shape {shape}")
        if out.numel() == 0:
            return
        if not shape:  # a scalar
            out.copy_(self._rows(e, 0, 1).reshape(()))
            return
        row_bytes = torch.Size(shape[1:]).numel() * e.dtype.itemsize
        inner = tuple(slice(o, o + s) for o, s in zip(offsets[1:], out.shape[1:]))
        per_block = max(1, BLOCK_BYTES // max(row_bytes, 1))
        first, rows = offsets[0], out.shape[0]
        for r in range(0, rows, per_block):
            n = min(per_block, rows - r)
            block = self._rows(e, first + r, n).view(n, *shape[1:])
            out[r : r + n].copy_(block[(slice(None), *inner)])

    @staticmethod
    def _rows(e: Entry, first: int, n: int) -> torch.Tensor:
        row_bytes = torch.Size(e.shape[1:]).numel() * e.dtype.itemsize
        buf = bytearray(n * row_bytes)
        with open(e.file, "rb") as f:
            f.seek(e.start + first * row_bytes)
            if f.readinto(buf) != len(buf):
                raise OSError(f"{e.file.name}: truncated tensor data")
        return torch.frombuffer(buf, dtype=e.dtype)


def resolve_model_dir(path: str) -> Path:
    """A local HF model directory as is; a hub id downloaded (config and safetensors only) to the HF cache."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
