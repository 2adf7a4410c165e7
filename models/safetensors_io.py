"""Read slices of tensors from HF safetensors files with plain file reads (no mmap, no whole tensor).

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range) and the
raw row-major data. A slice along dim 0 is one contiguous byte range; a slice along later dims (a
row-wise TP shard) is read in row blocks of at most `BLOCK_BYTES`. `read_many` reads the slices of many
tensors in file-offset order through a few reused buffers (`models/safetensors_reader.py`), so a reader
holds at most `safetensors_reader.BUFFERS` blocks besides its destinations. Plain reads, rather than the
mmap that `safe_open` uses, keep the touched file pages out of the process' resident memory: the page
cache is shared and reclaimable, an mmap's pages count against every rank that touched them.
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
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        items = [
            (k, v["dtype"], tuple(v["shape"]), int(v["data_offsets"][0]), int(v["data_offsets"][1]))
            for k, v in header.items()
            if k != "__metadata__"
        ]
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{file.name}: not a safetensors file ({why})") from None
    entries = {}
    for key, dtype, shape, begin, end in items:
        if dtype not in DTYPES:
            raise ValueError(f"{file.name}: tensor {key} has unsupported dtype {dtype}")
        if 8 + n + end > size:
            raise ValueError(
                f"{file.name}: truncated (tensor {key} ends at byte {8 + n + end}, the file has {size})"
            )
        entries[key] = Entry(file, DTYPES[dtype], shape, 8 + n + begin)
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
    """The tensors of one HF model directory, by name; `read_many` copies slices into destination tensors
    (`models/safetensors_reader.py`: file-offset order, background reads, casts on the destination's device)."""

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
        self.read_many([(key, offsets, out)])

    def read_many(self, requests: list[tuple[str, tuple[int, ...], torch.Tensor]]) -> None:
        """`read` for many (key, offsets, out) at once: the reads are sorted by file offset, merged into
        large contiguous reads and overlapped with the copies into `out`."""
        from models.safetensors_reader import read_pieces, slice_pieces

        pieces = []
        for key, offsets, out in requests:
            pieces += slice_pieces(key, self.entries[key], offsets, out, BLOCK_BYTES)
        read_pieces(pieces, BLOCK_BYTES)

    def close(self) -> None:
        """After the last read: the pinned read buffers go back to the OS."""
        from models.safetensors_reader import release_pinned

        release_pinned()


def resolve_model_dir(path: str) -> Path:
    """A local HF model directory as is; a hub id downloaded (config and safetensors only) to the HF cache."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
