"""Tokenise once, on one process, into an on-disk cache that every rank memory-maps.

Layout of `<cache_root>/tokenized/<key>/`: tokens.bin (int32, all documents concatenated), labels.bin
(int32, only when some label differs from its token), offsets.npy (int64 document starts, n_docs + 1)
and meta.json. The key hashes the input files (path, size, mtime) or hub name, the tokenizer and the
data settings that change the output; a directory under that key is complete by construction
because it appears through an atomic rename.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.sources import (
    DataError,
    Row,
    detect_format,
    iter_rows,
    parse_row,
    resolve_source,
    stable_hash,
)
from trainer.data.tokenize import (
    Encoder,
    EncodeSettings,
    _encode_in_worker,
    _init_worker,
    tokenizer_fingerprint,
)

log = logging.getLogger("longctx.data")
CACHE_VERSION = 1
CHUNK_ROWS = 512
_MAX_LOGGED_BAD = 5


class TokenStore:
    """A finished cache directory, memory-mapped: documents as one token stream plus offsets."""

    def __init__(self, path: str | Path, built: bool = False):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.built = built  # True when this process tokenised it (cache miss)
        n = self.meta["n_tokens"]
        self.tokens = np.memmap(self.path / "tokens.bin", dtype=np.int32, mode="r", shape=(n,))
        self.labels = (
            np.memmap(self.path / "labels.bin", dtype=np.int32, mode="r", shape=(n,))
            if self.meta["has_labels"]
            else None
        )
        self.offsets = np.load(self.path / "offsets.npy")

    @property
    def n_tokens(self) -> int:
        return self.meta["n_tokens"]

    @property
    def n_docs(self) -> int:
        return self.meta["n_docs"]

    @property
    def skipped_rows(self) -> int:
        return self.meta["skipped_rows"]


def cache_root(data_cfg: Any) -> Path:
    root = data_cfg.cache_dir or os.environ.get("LONGCTX_CACHE") or "~/.cache/longctx"
    return Path(root).expanduser() / "tokenized"


def _first_record(source: Any, data_cfg: Any) -> dict:
    # Streaming here too: a hub dataset must not be downloaded just to look at one row.
    for row in iter_rows(source, data_cfg.text_field, data_cfg.split, streaming=data_cfg.streaming):
        try:
            return parse_row(row)
        except DataError:
            if data_cfg.on_bad_row == "error":
                raise
    raise DataError(f"data.path: {data_cfg.path}: no readable rows")


def resolve_settings(data_cfg: Any, source: Any = None) -> tuple[Any, EncodeSettings]:
    """The source and the encode settings, with `format: auto` decided from the first row."""
    if data_cfg.on_bad_row not in ("error", "skip"):
        raise DataError(f"data.on_bad_row: {data_cfg.on_bad_row!r} is not one of error | skip")
    source = source or resolve_source(data_cfg.path)
    fmt = data_cfg.format
    if fmt == "auto":
        fmt = detect_format(
            _first_record(source, data_cfg), fmt, data_cfg.text_field, data_cfg.messages_field
        )
    else:
        detect_format({}, fmt, data_cfg.text_field, data_cfg.messages_field)
    return source, EncodeSettings.from_config(data_cfg, fmt)


def cache_key(source: Any, settings: EncodeSettings, tokenizer: Any, data_cfg: Any) -> str:
    return stable_hash(
        {
            "version": CACHE_VERSION,
            "source": source.fingerprint(),
            "split": data_cfg.split,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "settings": settings.__dict__,
            "on_bad_row": data_cfg.on_bad_row,
        }
    )


class BadRows:
    """Applies `data.on_bad_row`: raise on the first bad row, or skip and count (logged)."""

    def __init__(self, policy: str):
        self.policy = policy
        self.count = 0

    def __call__(self, message: str) -> None:
        if self.policy == "error":
            raise DataError(message)
        self.count += 1
        if self.count <= _MAX_LOGGED_BAD:
            log.warning("skipping bad row: %s", message)
        elif self.count == _MAX_LOGGED_BAD + 1:
            log.warning("skipping further bad rows (count reported at the end)")


def _chunks(rows: Iterator[Row], n: int) -> Iterator[list[Row]]:
    while chunk := list(islice(rows, n)):
        yield chunk


def _encoded_stream(
    rows: Iterator[Row], tokenizer: Any, settings: EncodeSettings, num_proc: int
) -> Iterator[list[Any]]:
    if num_proc <= 1:
        enc = Encoder(tokenizer, settings)
        for chunk in _chunks(rows, CHUNK_ROWS):
            yield enc.encode(chunk)
        return
    import multiprocessing as mp

    # spawn, not fork: the parent may hold torch/OpenMP and tokenizers thread pools that fork can deadlock.
    with mp.get_context("spawn").Pool(num_proc, _init_worker, (tokenizer, settings)) as pool:
        yield from pool.imap(_encode_in_worker, _chunks(rows, CHUNK_ROWS), chunksize=1)


def _build(tmp: Path, source: Any, settings: EncodeSettings, tokenizer: Any, data_cfg: Any) -> dict:
    tmp.mkdir(parents=True)
    bad = BadRows(data_cfg.on_bad_row)
    lengths: list[int] = []
    n_tokens = n_targets = 0
    has_labels = False
    t0 = time.time()
    rows = iter_rows(source, data_cfg.text_field, data_cfg.split)
    with open(tmp / "tokens.bin", "wb") as ftok:
        flab = None
        for results in _encoded_stream(rows, tokenizer, settings, data_cfg.num_proc):
            for res in results:
                if isinstance(res, str):
                    bad(res)
                    continue
                ids, labels = res
                if len(ids) == 0:
                    continue
                if labels is not None and flab is None:
                    # First masked document: labels so far equal tokens, so copy them once.
                    ftok.flush()
                    shutil.copyfile(tmp / "tokens.bin", tmp / "labels.bin")
                    flab = open(tmp / "labels.bin", "ab")  # noqa: SIM115 - closed below
                    has_labels = True
                ftok.write(ids.astype(np.int32).tobytes())
                if flab is not None:
                    flab.write((ids if labels is None else labels).astype(np.int32).tobytes())
                lengths.append(len(ids))
                n_tokens += len(ids)
                n_targets += len(ids) if labels is None else int((labels != -100).sum())
        if flab is not None:
            flab.close()
    if bad.count:
        log.warning("skipped %d bad rows in %s (data.on_bad_row: skip)", bad.count, data_cfg.path)
    if n_tokens == 0:
        raise DataError(f"data.path: {data_cfg.path}: no tokens after tokenisation")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(tmp / "offsets.npy", offsets)
    meta = {
        "path": data_cfg.path,
        "format": settings.fmt,
        "n_docs": len(lengths),
        "n_tokens": n_tokens,
        "n_label_tokens": n_targets,
        "skipped_rows": bad.count,
        "has_labels": has_labels,
        "seconds": round(time.time() - t0, 3),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _wait_for(final: Path, failed: Path, timeout_s: float, key: str) -> None:
    start = time.time()
    delay = 0.05
    while not (final / "meta.json").exists():
        # A marker from an older run is ignored; the slack covers ranks that start a little late.
        if failed.exists() and failed.stat().st_mtime >= start - 600:
            raise DataError(f"rank 0 failed to tokenise the data: {failed.read_text().strip()}")
        if time.time() - start > timeout_s:
            raise DataError(
                f"timed out after {timeout_s:.0f}s waiting for rank 0 to write the data cache {final} "
                "(data.cache_wait_s; with a node-local data.cache_dir run --preprocess on every node first)"
            )
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def prepare_dataset(
    cfg: Any,
    tokenizer: Any,
    rank: int = 0,
    barrier_fn: Callable[[], None] | None = None,
) -> TokenStore:
    """Tokenise `cfg.data` once and return the memory-mapped cache.

    Rank 0 tokenises (with `data.num_proc` workers) into a temp dir renamed into place; other ranks poll
    the file system for up to `data.cache_wait_s` seconds - a file wait, not a collective, so a long
    tokenisation never trips an NCCL/gloo timeout. `barrier_fn`, if given, runs once the cache is open
    on this rank (cheap, everyone arrives together)."""
    data = cfg.data
    source, settings = resolve_settings(data)
    key = cache_key(source, settings, tokenizer, data)
    root = cache_root(data)
    final, failed = root / key, root / f"{key}.failed"
    built = False
    if rank == 0 and not (final / "meta.json").exists():
        failed.unlink(missing_ok=True)
        tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        log.info("tokenising %s into %s (num_proc=%d)", data.path, final, data.num_proc)
        try:
            meta = _build(tmp, source, settings, tokenizer, data)
            try:
                os.rename(tmp, final)
                built = True
            except OSError:
                # Another job built the same key meanwhile; its copy is equivalent.
                shutil.rmtree(tmp, ignore_errors=True)
            log.info(
                "tokenised %d docs, %d tokens in %.1fs", meta["n_docs"], meta["n_tokens"], meta["seconds"]
            )
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{type(e).__name__}: {e}\n")
            raise
    elif rank != 0:
        _wait_for(final, failed, float(getattr(data, "cache_wait_s", 86400.0)), key)
    store = TokenStore(final, built=built)
    if barrier_fn is not None:
        barrier_fn()
    return store


def preprocess(cfg: Any) -> TokenStore:
    """`train.py --preprocess`: build (or find) the cache and print where it is and what it holds."""
    from trainer.data.tokenize import load_tokenizer

    store = prepare_dataset(cfg, load_tokenizer(cfg))
    m = store.meta
    seq = cfg.training.seq_len
    state = "built" if store.built else "reused"
    print(f"data cache ({state}): {store.path}")
    print(
        f"  format={m['format']} docs={m['n_docs']} tokens={m['n_tokens']} "
        f"trained_tokens={m['n_label_tokens']} skipped_rows={m['skipped_rows']}"
    )
    print(f"  sequences at seq_len={seq}: {max(0, (m['n_tokens'] - 1) // seq)}")
    return store
