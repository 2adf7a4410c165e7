"""The batched safetensors reader (models/safetensors_reader.py): values, error paths, no leftover threads.

Reference: the `safetensors` package's own `load_file`, sliced and cast by torch. Blocks as small as a few
bytes force many reads, reads merged across tensors, several reader threads and a saturated buffer pool.
"""

from __future__ import annotations

import json
import os
import random
import struct
import threading

import pytest
import torch

from models import safetensors_reader
from models.safetensors_io import SafetensorsCheckpoint


def _write_sharded(directory, seed: int) -> dict[str, torch.Tensor]:
    """Two files and an index: bf16, fp32, fp16 and int tensors of 0 to 3 dims, one of them empty."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed.weight": torch.randn(37, 19, generator=g).bfloat16(),
        "model.layers.0.w": torch.randn(5, 3, 7, generator=g),
        "model.layers.0.norm": torch.randn(100, generator=g).half(),
        "model.scale": torch.randn((), generator=g).bfloat16(),
        "model.ids": torch.randint(-50, 50, (6, 4), generator=g),
        "model.empty": torch.zeros(0, 4).bfloat16(),
        "lm_head.weight": torch.randn(23, 11, generator=g).bfloat16(),
    }
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    for file, keys in files.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(directory, file))
    weight_map = {k: f for f, keys in files.items() for k in keys}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def _requests(tensors, rng: random.Random):
    """Whole tensors and random blocks (any dims), into fp32, fp64 and bf16 destinations."""
    requests, expected = [], []
    for key, t in tensors.items():
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            requests.append((key, (0,) * t.dim(), torch.full(t.shape, float("nan"), dtype=dtype)))
            expected.append(t.to(dtype))
        if t.dim() and t.numel():
            for _ in range(3):
                lo = [rng.randrange(d) for d in t.shape]
                hi = [rng.randrange(a, d) + 1 for a, d in zip(lo, t.shape)]
                block = tuple(slice(a, b) for a, b in zip(lo, hi))
                requests.append((key, tuple(lo), torch.empty([b - a for a, b in zip(lo, hi)])))
                expected.append(t[block].float())
    return requests, expected


@pytest.mark.parametrize("block_bytes", [7, 64, 2**20])
def test_read_many_equals_safetensors(tmp_path, block_bytes, monkeypatch):
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    tensors = _write_sharded(tmp_path, seed)
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert set(ckpt.entries) == set(tensors)
    requests, expected = _requests(tensors, random.Random(seed))
    monkeypatch.setattr("models.safetensors_io.BLOCK_BYTES", block_bytes)
    threads = threading.active_count()
    ckpt.read_many(requests)
    assert threading.active_count() == threads  # the readers have ended
    for (key, offsets, out), want in zip(requests, expected):
        assert torch.equal(out, want), f"{key} at {offsets} (seed {seed}, blocks of {block_bytes} bytes)"


def test_reads_merge_in_file_order(tmp_path):
    tensors = _write_sharded(tmp_path, 0)
    ckpt = SafetensorsCheckpoint(tmp_path)
    pieces = []
    for key, t in tensors.items():
        pieces += safetensors_reader.slice_pieces(
            key, ckpt.entries[key], (0,) * t.dim(), torch.empty(t.shape), 2**20
        )
    chunks = safetensors_reader.plan_chunks(pieces, 2**20)
    assert len(chunks) == 2  # one read per file: its tensors are adjacent
    assert all(len(c.pieces) == len([p for p in pieces if p.file == c.file]) for c in chunks)
    small = safetensors_reader.plan_chunks(pieces, 64)
    assert all(c.nbytes <= 64 or len(c.pieces) == 1 for c in small) and len(small) > 2


def _raw_file(path, tensors: list[tuple[str, str, list[int], bytes]]) -> None:
    header, offset = {}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(t[3] for t in tensors))


def test_tensor_at_an_unaligned_offset(tmp_path):
    values = torch.randn(3, 2).bfloat16()
    _raw_file(
        tmp_path / "model.safetensors",
        [
            ("flags", "U8", [3], b"\x01\x02\x03"),
            ("w", "BF16", [3, 2], values.view(torch.uint8).numpy().tobytes()),
        ],
    )
    ckpt = SafetensorsCheckpoint(tmp_path)
    out, flags = torch.empty(3, 2), torch.empty(3, dtype=torch.int64)
    ckpt.read_many([("w", (0, 0), out), ("flags", (0,), flags)])
    assert torch.equal(out, values.float()) and flags.tolist() == [1, 2, 3]


def test_file_truncated_while_reading_names_the_file(tmp_path):
    """A reader thread meets the end of the file (it shrank after the header was checked): the error reaches
    the caller as one line naming the file, after the other readers have stopped."""
    tensors = _write_sharded(tmp_path, 1)
    ckpt = SafetensorsCheckpoint(tmp_path)
    last = tmp_path / "model-00002-of-00002.safetensors"
    os.truncate(last, last.stat().st_size - 40)
    requests, _ = _requests(tensors, random.Random(1))
    threads = threading.active_count()
    with pytest.raises(OSError) as info:
        safetensors_reader.read_pieces(
            [
                p
                for k, o, out in requests
                for p in safetensors_reader.slice_pieces(k, ckpt.entries[k], o, out, 16)
            ],
            16,
            readers=3,
            buffers=4,
        )
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{last.name}: truncated tensor data"), message
    assert threading.active_count() == threads


def test_error_while_copying_stops_the_readers(tmp_path, monkeypatch):
    tensors = _write_sharded(tmp_path, 2)
    ckpt = SafetensorsCheckpoint(tmp_path)
    calls = []
    deliver = safetensors_reader._deliver

    def failing(chunk, buf, staging):
        calls.append(chunk)
        if len(calls) == 3:
            raise RuntimeError("copy failed")
        deliver(chunk, buf, staging)

    monkeypatch.setattr(safetensors_reader, "_deliver", failing)
    monkeypatch.setattr("models.safetensors_io.BLOCK_BYTES", 16)
    threads = threading.active_count()
    with pytest.raises(RuntimeError, match="copy failed"):
        ckpt.read_many(_requests(tensors, random.Random(2))[0])
    assert threading.active_count() == threads


def test_bad_files_are_named(tmp_path):
    _write_sharded(tmp_path, 3)
    first = tmp_path / "model-00001-of-00002.safetensors"
    data = first.read_bytes()
    first.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=f"^{first.name}: truncated \\(tensor .* ends at byte"):
        SafetensorsCheckpoint(tmp_path)
    first.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:])
    with pytest.raises(ValueError, match=f"^{first.name}: not a safetensors file"):
        SafetensorsCheckpoint(tmp_path)
    first.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(ValueError, match=f"^{first.name}: not a safetensors file \\(a header of"):
        SafetensorsCheckpoint(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_read_many_into_cuda_equals_safetensors(tmp_path, monkeypatch):
    """Pinned buffers, one asynchronous copy per block, the cast on the GPU; CPU destinations in the same
    call take the host path."""
    seed = random.randrange(2**31)
    tensors = _write_sharded(tmp_path, seed)
    ckpt = SafetensorsCheckpoint(tmp_path)
    requests, expected = _requests(tensors, random.Random(seed))
    requests = [(k, o, out.cuda() if i % 3 else out) for i, (k, o, out) in enumerate(requests)]
    for block_bytes in (64, 2**20):
        monkeypatch.setattr("models.safetensors_io.BLOCK_BYTES", block_bytes)
        for _, _, out in requests:
            out.fill_(0)
        ckpt.read_many(requests)
        ckpt.close()
        for (key, offsets, out), want in zip(requests, expected):
            assert torch.equal(out.cpu(), want), f"{key} at {offsets} (seed {seed}, blocks of {block_bytes})"


def test_planner_knows_the_read_buffers():
    from models.safetensors_io import BLOCK_BYTES
    from parallel.planner.load import READ_BLOCK_BYTES, READ_BUFFERS

    assert (READ_BLOCK_BYTES, READ_BUFFERS) == (BLOCK_BYTES, safetensors_reader.BUFFERS)
