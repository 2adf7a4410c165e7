"""The per-dp-rank batch iterator: infinite over epochs, seeded shuffling, exact resume.

Map-style (default): the packed sequences of every epoch are ordered by one global permutation seeded by
(training.seed, epoch); epochs are laid end to end into one infinite stream and global batch g is the
slice [g*G, (g+1)*G) of it (G = dp_size * micro_batch_size), dp rank r taking the r-th micro-batch of
that slice. The state is a position in that stream, so it does not depend on dp_size: a run resumed
with another dp size continues with exactly the sequences that were next.

Streaming: rows are striped over dp ranks (or `split_dataset_by_node` for hub datasets), shuffled in a
seeded buffer and packed on the fly; the state is per dp rank (row index + token offset) and cannot
follow a dp resize.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch

from trainer.data.cache import BadRows, TokenStore, prepare_dataset, resolve_settings
from trainer.data.packing import StreamPacker, num_windows, window_from_store
from trainer.data.sources import DataError, Row, iter_rows
from trainer.data.tokenize import Encoder

log = logging.getLogger("longctx.data")
KEYS = ("input_ids", "labels", "position_ids", "doc_ids")


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in KEYS}


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """Order of the n packed sequences in an epoch (identical on every rank and for every dp size)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class LongCtxLoader:
    """Iterator of dicts of int64 CPU tensors {input_ids, labels, position_ids, doc_ids}, each
    [micro_batch_size, seq_len]: the full (not yet CP-sharded) sequences of this dp rank."""

    def __init__(self, cfg: Any, dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seq_len = cfg.training.seq_len
        self.micro_batch_size = cfg.training.micro_batch_size
        self.seed = cfg.training.seed
        self.shuffle = cfg.data.shuffle
        self.doc_mask = cfg.data.doc_mask

    @property
    def tokens_per_batch(self) -> int:
        """Tokens in one micro-batch of this dp rank (before CP sharding)."""
        return self.micro_batch_size * self.seq_len

    @property
    def global_tokens_per_batch(self) -> int:
        return self.tokens_per_batch * self.dp_size

    def __iter__(self) -> LongCtxLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        raise NotImplementedError

    def _check(self, sd: dict[str, Any], keys: tuple[str, ...]) -> None:
        mine = self.state_dict()
        for k in keys:
            if sd.get(k) != mine[k]:
                raise DataError(
                    f"data state in the checkpoint does not fit this run: {k}={sd.get(k)!r} there, "
                    f"{mine[k]!r} now (same data, tokenizer, training.seq_len and training.seed are needed "
                    "to resume the data order)"
                )


class MapLoader(LongCtxLoader):
    """Batches from a token cache; every sequence is addressable, so resume is a position."""

    def __init__(self, cfg: Any, store: TokenStore, dp_rank: int, dp_size: int):
        super().__init__(cfg, dp_rank, dp_size)
        self.store = store
        self.num_sequences = num_windows(store.n_tokens, self.seq_len)
        if self.num_sequences == 0:
            raise DataError(
                f"data.path: {cfg.data.path} has {store.n_tokens} tokens, fewer than training.seq_len + 1 "
                f"= {self.seq_len + 1}"
            )
        self.position = 0  # sequences consumed by all dp ranks together, over all epochs
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def skipped_rows(self) -> int:
        return self.store.skipped_rows

    @property
    def epoch(self) -> int:
        return self.position // self.num_sequences

    def _sequence(self, pos: int) -> dict:
        epoch, i = divmod(pos, self.num_sequences)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.num_sequences, epoch, self.seed, self.shuffle))
        k = int(self._order[1][i])
        s = self.store
        return window_from_store(s.tokens, s.labels, s.offsets, k, self.seq_len, self.doc_mask)

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.position + self.dp_rank * self.micro_batch_size
        batch = [self._sequence(first + j) for j in range(self.micro_batch_size)]
        self.position += self.dp_size * self.micro_batch_size
        return _collate(batch)

    def state_dict(self) -> dict[str, Any]:
        epoch, offset = divmod(self.position, self.num_sequences)
        return {
            "kind": "map",
            "epoch": epoch,
            "offset": offset,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "num_sequences": self.num_sequences,
            "dp_size": self.dp_size,
            "micro_batch_size": self.micro_batch_size,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._check(sd, ("kind", "seed", "shuffle", "seq_len", "num_sequences"))
        if (sd["dp_size"], sd["micro_batch_size"]) != (self.dp_size, self.micro_batch_size):
            log.info(
                "data: resuming with dp_size=%d micro_batch_size=%d (was %d, %d); the global sequence "
                "order continues unchanged",
                self.dp_size,
                self.micro_batch_size,
                sd["dp_size"],
                sd["micro_batch_size"],
            )
        self.position = sd["epoch"] * self.num_sequences + sd["offset"]


def _buffer_shuffle(rows: Iterator[Row], size: int, rng: np.random.Generator) -> Iterator[Row]:
    buf: list[Row] = []
    for row in rows:
        if len(buf) < size:
            buf.append(row)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = row
    for j in rng.permutation(len(buf)):
        yield buf[j]


class StreamLoader(LongCtxLoader):
    """Tokenises and packs this dp rank's share of the rows on the fly."""

    def __init__(self, cfg: Any, tokenizer: Any, dp_rank: int, dp_size: int):
        super().__init__(cfg, dp_rank, dp_size)
        self.data = cfg.data
        self.source, settings = resolve_settings(cfg.data)
        self.encoder = Encoder(tokenizer, settings)
        self.bad = BadRows(cfg.data.on_bad_row)
        self.epoch, self.row, self.row_offset, self.offset = 0, 0, 0, 0
        self._it: Iterator[dict] | None = None

    @property
    def skipped_rows(self) -> int:
        return self.bad.count

    def _rows(self, epoch: int) -> Iterator[Row]:
        d = self.data
        rows = iter_rows(self.source, d.text_field, d.split, True, self.dp_rank, self.dp_size)
        if self.shuffle:
            rows = _buffer_shuffle(
                rows, d.shuffle_buffer, np.random.default_rng([self.seed, epoch, self.dp_rank])
            )
        return rows

    def _sequences(self) -> Iterator[tuple[dict, tuple[int, int], int]]:
        """(sequence, (row, row_offset) where the next one starts, epoch) forever."""
        while True:
            epoch, start_row, skip = self.epoch, self.row, self.row_offset
            packer = StreamPacker(self.seq_len, self.doc_mask)
            # Rows before the resume point are read but not tokenised.
            rows = enumerate(islice(self._rows(epoch), start_row, None), start_row)
            produced = False
            while chunk := list(islice(rows, 64)):
                for (i, _), res in zip(chunk, self.encoder.encode([r for _, r in chunk])):
                    if isinstance(res, str):
                        self.bad(res)
                        continue
                    ids, labels = res
                    for seq in packer.add(i, ids, labels, skip if i == start_row else 0):
                        produced = True
                        yield seq, packer.head or (i + 1, 0), epoch
            if not produced and start_row == 0 and skip == 0:
                raise DataError(
                    f"data.path: {self.data.path}: dp rank {self.dp_rank} of {self.dp_size} got fewer than "
                    f"training.seq_len + 1 = {self.seq_len + 1} tokens in a whole epoch"
                )
            self.epoch, self.row, self.row_offset, self.offset = epoch + 1, 0, 0, 0

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = self._sequences()
        batch = []
        for _ in range(self.micro_batch_size):
            seq, (row, off), epoch = next(self._it)
            batch.append(seq)
            self.epoch, self.row, self.row_offset = epoch, row, off
            self.offset += 1
        return _collate(batch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "stream",
            "epoch": self.epoch,
            "offset": self.offset,
            "row": self.row,
            "row_offset": self.row_offset,
            "skipped_rows": self.bad.count,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "dp_size": self.dp_size,
            "dp_rank": self.dp_rank,
            "micro_batch_size": self.micro_batch_size,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("kind") == "stream" and (sd.get("dp_size"), sd.get("dp_rank")) != (
            self.dp_size,
            self.dp_rank,
        ):
            raise DataError(
                f"streaming data state was saved with dp_size={sd.get('dp_size')} (rank {sd.get('dp_rank')}); "
                f"it cannot follow a resize to dp_size={self.dp_size}: resume with the same dp size or use "
                "data.streaming: false (map-style order is dp-size independent)"
            )
        self._check(sd, ("kind", "seed", "shuffle", "seq_len"))
        self.epoch, self.offset = sd["epoch"], sd["offset"]
        self.row, self.row_offset = sd["row"], sd["row_offset"]
        self.bad.count = sd.get("skipped_rows", 0)
        self._it = None


def _global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def build_dataloader(
    cfg: Any,
    tokenizer: Any,
    dp_rank: int,
    dp_size: int,
    *,
    rank: int | None = None,
    store: TokenStore | None = None,
    barrier_fn: Any = None,
) -> LongCtxLoader:
    """The loader for one dp rank. Map-style unless `data.streaming`; tokenises through the cache
    (`prepare_dataset`, rank 0 builds it - `rank` defaults to the global rank) unless `store` is given."""
    if cfg.data.streaming:
        return StreamLoader(cfg, tokenizer, dp_rank, dp_size)
    if store is None:
        store = prepare_dataset(cfg, tokenizer, _global_rank() if rank is None else rank, barrier_fn)
    return MapLoader(cfg, store, dp_rank, dp_size)
