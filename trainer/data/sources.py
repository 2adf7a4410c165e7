"""Where rows come from: local jsonl/json/parquet/txt files or directories, or a hub dataset.

Local files are read by a small line reader of our own rather than `datasets`' json builder, because
a malformed line must be reported (or skipped) with its file and line number, and pyarrow's reader
can do neither. Hub datasets go through `datasets.load_dataset` (streaming or not).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt"}


class DataError(ValueError):
    """Bad training data or data settings; the message names the file/row or the config key."""


@dataclass(frozen=True)
class Row:
    """One raw record. `payload` is a json line (str, parsed later so workers share the cost), a dict
    (parquet / json array / hub), or the whole text of a .txt file."""

    file: str
    row: int
    payload: Any
    kind: str  # jsonl | dict | txt

    def where(self) -> str:
        unit = "line" if self.kind == "jsonl" else "row"
        return f"{self.file} {unit} {self.row}"


@dataclass(frozen=True)
class Source:
    """A resolved `data.path`: either local files (sorted) or a hub dataset name."""

    path: str
    files: tuple[str, ...] = ()
    hub: str | None = None

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the input for the cache key: file names with sizes and mtimes, or the hub name."""
        if self.hub is not None:
            return {"hub": self.hub}
        files = []
        for f in self.files:
            st = os.stat(f)
            files.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
        return {"files": files}


def resolve_source(path: str) -> Source:
    """Local file, directory (every supported file below it, sorted) or hub dataset name."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix not in EXTENSIONS:
            raise DataError(f"data.path: {path}: unsupported extension (use one of {sorted(EXTENSIONS)})")
        return Source(path=path, files=(str(p),))
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in EXTENSIONS)
        if not files:
            raise DataError(f"data.path: {path}: directory holds no {'/'.join(sorted(EXTENSIONS))} files")
        return Source(path=path, files=tuple(files))
    looks_local = path.startswith((".", "/", "~")) or Path(path).suffix in EXTENSIONS
    if looks_local or path.count("/") > 1:
        raise DataError(f"data.path: {path}: no such file or directory")
    return Source(path=path, hub=path)


def _iter_file(path: str, text_field: str) -> Iterator[Row]:
    kind = EXTENSIONS[Path(path).suffix]
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file")
    if kind == "txt":
        # One document per .txt file: long-context corpora want whole documents, not lines.
        with open(path, encoding="utf-8", errors="replace") as f:
            yield Row(path, 1, {text_field: f.read()}, "dict")
        return
    if kind == "parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                n += 1
                yield Row(path, n, rec, "dict")
        if n == 0:
            raise DataError(f"{path}: empty file (no rows)")
        return
    with open(path, encoding="utf-8") as f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        f.seek(0)
        if kind == "json" and first == "[":
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
            for i, rec in enumerate(rows, 1):
                yield Row(path, i, rec, "dict")
            if not rows:
                raise DataError(f"{path}: empty file (no rows)")
            return
        n = 0
        for lineno, line in enumerate(f, 1):
            if line.strip():
                n += 1
                yield Row(path, lineno, line, "jsonl")
        if n == 0:
            raise DataError(f"{path}: empty file (no rows)")


def _iter_hub(name: str, split: str, streaming: bool, rank: int, world: int) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as e:  # the hub raises many exception types; the user needs one line
        raise DataError(f"data.path: could not load dataset {name!r} split {split!r}: {e}") from None
    if world > 1:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(ds, rank=rank, world_size=world)
    for i, rec in enumerate(ds, 1):
        yield Row(name, i, rec, "dict")


def iter_rows(
    source: Source,
    text_field: str = "text",
    split: str = "train",
    streaming: bool = False,
    rank: int = 0,
    world: int = 1,
) -> Iterator[Row]:
    """All rows in order. With world > 1 only this rank's share: hub datasets via
    `split_dataset_by_node`, local files by striding rows (row i goes to rank i % world)."""
    if source.hub is not None:
        yield from _iter_hub(source.hub, split, streaming, rank, world)
        return
    i = 0
    for f in source.files:
        for r in _iter_file(f, text_field):
            if i % world == rank:
                yield r
            i += 1


def parse_row(row: Row) -> dict[str, Any]:
    """The row as a dict; raises DataError naming file and line for malformed json."""
    if row.kind == "jsonl":
        try:
            rec = json.loads(row.payload)
        except json.JSONDecodeError as e:
            raise DataError(f"{row.where()}: malformed JSON ({e.msg})") from None
    else:
        rec = row.payload
    if not isinstance(rec, dict):
        raise DataError(f"{row.where()}: expected a JSON object, got {type(rec).__name__}")
    return rec


def detect_format(rec: dict[str, Any], fmt: str, text_field: str, messages_field: str) -> str:
    """`data.format`, with auto resolved from the first row's columns."""
    if fmt not in ("auto", "text", "chat", "tokens"):
        raise DataError(f"data.format: {fmt!r} is not one of auto | text | chat | tokens")
    if fmt != "auto":
        return fmt
    if "input_ids" in rec:
        return "tokens"
    if messages_field in rec:
        return "chat"
    if text_field in rec:
        return "text"
    raise DataError(
        f"data.format auto: first row has columns {sorted(rec)}; expected 'input_ids', "
        f"{messages_field!r} (data.messages_field) or {text_field!r} (data.text_field)"
    )


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]
