"""Fill many destination tensors from safetensors byte ranges: reads in file-offset order, in the background,
with bounded memory.

A request (one destination's block of a saved tensor) becomes pieces of whole saved rows of at most one
block (`slice_pieces`); the pieces of all requests are sorted by (file, byte offset) and merged into reads
of at most one block each (`plan_chunks`: on one rank a whole file is a run of adjacent tensors, so most
reads are a full block). `READERS` threads read the blocks with `os.preadv` (the GIL is released while the
kernel copies) into a pool of `BUFFERS` reused host buffers, while the calling thread copies each filled
buffer into its destinations. With a CUDA destination the buffers are pinned and the saved bytes (bf16,
half of the fp32 masters) go to the GPU in one asynchronous copy per block and are cast there: a blocking
copy with a dtype change would cast on the CPU and move twice the bytes through pageable memory.

Memory: `BUFFERS` host blocks (and one device block), whatever the checkpoint's size.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

READERS = 4  # one thread copies ~5 GB/s out of the page cache: a GPU takes bf16 blocks faster than that
BUFFERS = 6  # host read buffers of one block each, shared by the readers
# Only host destinations: the cast on the host is the bottleneck, more buffers would only hold memory.
CPU_BUFFERS = 3
MERGE_GAP = 2**20  # bytes between two pieces that a read may span rather than be split in two


@dataclass(frozen=True)
class Piece:
    """Saved rows [row, row + rows) of `key` (`nbytes` bytes at `start` in `file`), of which `out` gets the
    columns `inner`."""

    key: str
    file: Path
    start: int
    nbytes: int
    dtype: torch.dtype
    view_shape: tuple[int, ...]
    inner: tuple[slice, ...]
    out: torch.Tensor


@dataclass
class Chunk:
    """One contiguous read from `file`, covering its pieces."""

    file: Path
    start: int
    nbytes: int
    pieces: list[Piece] = field(default_factory=list)


def slice_pieces(
    key: str, entry: Any, offsets: tuple[int, ...], out: torch.Tensor, block_bytes: int
) -> list[Piece]:
    """The pieces that fill `out` with the block of saved tensor `entry` (a `safetensors_io.Entry`) starting at
    `offsets`: runs of at most `block_bytes` of whole saved rows (a TP shard along a later dim is taken
    from its rows)."""
    shape = entry.shape
    if len(offsets) != len(shape) or out.dim() != len(shape):
        raise ValueError(f"{key}: slice of rank {out.dim()} for a tensor of shape {shape}")
    if any(o + s > d for o, s, d in zip(offsets, out.shape, shape)):
        raise ValueError(f"{key}: slice {tuple(out.shape)} at {offsets} exceeds the saved shape {shape}")
    if out.numel() == 0:
        return []
    size = entry.dtype.itemsize
    if not shape:  # a scalar
        return [Piece(key, entry.file, entry.start, size, entry.dtype, (), (), out)]
    row_bytes = torch.Size(shape[1:]).numel() * size
    inner = tuple(slice(o, o + s) for o, s in zip(offsets[1:], out.shape[1:]))
    if all(s.start == 0 and s.stop == d for s, d in zip(inner, shape[1:])):
        inner = ()  # whole rows: the destination takes the bytes as they are
    per_block = max(1, block_bytes // row_bytes)
    first, rows = offsets[0], out.shape[0]
    pieces = []
    for r in range(0, rows, per_block):
        n = min(per_block, rows - r)
        start = entry.start + (first + r) * row_bytes
        pieces.append(
            Piece(key, entry.file, start, n * row_bytes, entry.dtype, (n, *shape[1:]), inner, out[r : r + n])
        )
    return pieces


def plan_chunks(pieces: list[Piece], block_bytes: int) -> list[Chunk]:
    """Pieces in (file, offset) order, merged into reads of at most `block_bytes` (a single piece may be
    larger: one saved row over a block)."""
    chunks: list[Chunk] = []
    for p in sorted(pieces, key=lambda p: (str(p.file), p.start)):
        c = chunks[-1] if chunks else None
        end = p.start + p.nbytes
        if (
            c is not None
            and c.file == p.file
            and p.start <= c.start + c.nbytes + MERGE_GAP
            and end - c.start <= block_bytes
        ):
            c.nbytes = max(c.nbytes, end - c.start)
            c.pieces.append(p)
        else:
            chunks.append(Chunk(p.file, p.start, p.nbytes, [p]))
    return chunks


def _host_buffer(size: int, pinned: bool) -> torch.Tensor:
    if pinned:  # page-locked: the copy to the GPU is a DMA that can run while the next block is read
        return torch.empty(size, dtype=torch.uint8, pin_memory=True)
    # Private anonymous memory in 2 MiB pages where the kernel allows it (shared memory would not get
    # them): a 64 MiB buffer takes 32 page faults on first use instead of 16384 (measured with 6 buffers
    # on a 0.75 GiB load to the host: 94k faults, 0.3 of its 1.6 CPU seconds).
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        area.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(area, dtype=torch.uint8)


def _pread(fd: int, chunk: Chunk, buf: torch.Tensor) -> None:
    view = memoryview(buf.numpy())[: chunk.nbytes]
    got = 0
    while got < chunk.nbytes:
        try:
            n = os.preadv(fd, [view[got:]], chunk.start + got)
        except OSError as exc:
            raise OSError(f"{chunk.file.name}: {exc.strerror or exc}") from exc
        if n == 0:
            raise OSError(
                f"{chunk.file.name}: truncated tensor data (tensor {chunk.pieces[0].key} needs bytes up to "
                f"{chunk.start + chunk.nbytes}, the file ends at {chunk.start + got})"
            )
        got += n


def _deliver(chunk: Chunk, buf: torch.Tensor, staging: torch.Tensor | None) -> None:
    """Copy the pieces of a filled buffer into their destinations; returns once `buf` may be reused."""
    host = buf[: chunk.nbytes]
    device_copy, done = None, None
    if staging is not None and any(p.out.device == staging.device for p in chunk.pieces):
        device_copy = staging[: chunk.nbytes]
        device_copy.copy_(host, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(staging.device))
    for p in chunk.pieces:
        src = device_copy if device_copy is not None and p.out.device == staging.device else host
        raw = src[p.start - chunk.start : p.start - chunk.start + p.nbytes]
        if raw.storage_offset() % p.dtype.itemsize:  # a tensor saved at an unaligned offset
            raw = raw.clone()
        values = raw.view(p.dtype).view(p.view_shape)
        if p.inner:
            values = values[(slice(None), *p.inner)]
        p.out.copy_(values)  # same device: a cast kernel there, queued after the block's copy
    if done is not None:
        done.synchronize()  # the casts may still run: they read the device copy, not `buf`


def read_pieces(
    pieces: list[Piece], block_bytes: int, readers: int | None = None, buffers: int | None = None
) -> None:
    """Fill every piece's destination, with `readers` threads (default `READERS`) and `buffers` host blocks
    (default `BUFFERS`). An error of any reader (a truncated file, an I/O error) is raised here, naming the
    file, after the other readers have stopped."""
    chunks = plan_chunks(pieces, block_bytes)
    if not chunks:
        return
    device = next((p.out.device for p in pieces if p.out.device.type == "cuda"), None)
    buffers = max(2, buffers or (BUFFERS if device is not None else CPU_BUFFERS))
    readers = min(readers or READERS, buffers - 1)
    size = max(c.nbytes for c in chunks)
    free: queue.Queue = queue.Queue()
    for _ in range(min(buffers, len(chunks))):
        free.put(_host_buffer(size, pinned=device is not None))
    staging = None if device is None else torch.empty(size, dtype=torch.uint8, device=device)
    todo: queue.Queue = queue.Queue()
    for c in chunks:
        todo.put(c)
    filled: queue.Queue = queue.Queue()
    stop = threading.Event()
    fds = {}
    try:
        for file in {c.file for c in chunks}:
            fds[file] = os.open(file, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):  # read-ahead hint for a cold page cache
                os.posix_fadvise(fds[file], 0, 0, os.POSIX_FADV_SEQUENTIAL)

        def read() -> None:
            try:
                while not stop.is_set():
                    try:
                        c = todo.get_nowait()
                    except queue.Empty:
                        return
                    buf = free.get()
                    if buf is None:  # stopped while waiting for a buffer
                        return
                    _pread(fds[c.file], c, buf)
                    filled.put((c, buf))
            except BaseException as exc:  # handed to the calling thread, which raises it
                filled.put((None, exc))

        threads = [threading.Thread(target=read, daemon=True) for _ in range(min(readers, len(chunks)))]
        for t in threads:
            t.start()
        try:
            for _ in range(len(chunks)):
                c, buf = filled.get()
                if c is None:
                    raise buf
                _deliver(c, buf, staging)
                free.put(buf)
        finally:
            stop.set()
            for _ in threads:
                free.put(None)
            for t in threads:
                t.join()
    finally:
        for fd in fds.values():
            os.close(fd)
    if device is not None:
        torch.cuda.current_stream(device).synchronize()  # `staging` is freed on return


def release_pinned() -> None:
    """Give the pinned read buffers back to the OS (torch's host allocator would keep them cached)."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if empty is not None and torch.cuda.is_available():
        empty()
