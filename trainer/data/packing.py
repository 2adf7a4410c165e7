"""Packing documents into fixed-length sequences (pure numpy functions).

The token stream is all documents concatenated in order. Sequence k is the window of S + 1 stream
tokens starting at k * S: inputs are its first S tokens, targets its last S (so consecutive windows
overlap by one token and every stream token except the very first is a target exactly once - next-token
labels are computed here, on the full unsharded sequence, before any CP split). The tail that does not
fill a window is dropped.

With doc_mask: position ids restart at 0 at every document start (and at the start of a sequence, for a
document continued from the previous one: RoPE only sees relative positions, which that segment keeps);
doc_ids number the segments 0, 1, 2, ... within the sequence; the last token of a document gets label
-100 so no target crosses a document boundary. Without doc_mask: positions are arange(S), doc_ids 0,
and targets run across documents.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

IGNORE = -100


def pack_window(tokens: np.ndarray, label_src: np.ndarray, starts: np.ndarray, doc_mask: bool) -> dict:
    """One sequence from S + 1 consecutive stream tokens.

    tokens, label_src: [S + 1] token ids and per-token label values (-100 = never a target);
    starts: [S + 1] bool, True where a document begins. Returns int64 arrays of length S.
    """
    s = len(tokens) - 1
    input_ids = np.asarray(tokens[:s], dtype=np.int64)
    labels = np.asarray(label_src[1:], dtype=np.int64).copy()
    if not doc_mask:
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": np.arange(s, dtype=np.int64),
            "doc_ids": np.zeros(s, dtype=np.int64),
        }
    starts = np.asarray(starts, dtype=bool)
    labels[starts[1:]] = IGNORE  # token i ends a document when token i + 1 starts the next one
    seg_start = starts[:s].copy()
    seg_start[0] = True
    doc_ids = np.cumsum(seg_start, dtype=np.int64) - 1
    idx = np.arange(s, dtype=np.int64)
    last_start = np.maximum.accumulate(np.where(seg_start, idx, 0))
    return {"input_ids": input_ids, "labels": labels, "position_ids": idx - last_start, "doc_ids": doc_ids}


def num_windows(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def window_from_store(
    tokens: np.ndarray,
    labels: np.ndarray | None,
    offsets: np.ndarray,
    k: int,
    seq_len: int,
    doc_mask: bool,
) -> dict:
    """Sequence k of a flat stream (tokens, optional label values, document offsets)."""
    a, b = k * seq_len, k * seq_len + seq_len + 1
    tok = np.asarray(tokens[a:b])
    lab = tok if labels is None else np.asarray(labels[a:b])
    starts = np.zeros(b - a, dtype=bool)
    lo, hi = np.searchsorted(offsets, [a, b])
    starts[offsets[lo:hi] - a] = True
    return pack_window(tok, lab, starts, doc_mask)


def flatten(docs: Sequence[Sequence[int]], labels: Sequence[Sequence[int] | None] | None = None):
    """(tokens, label values, offsets) for a list of documents; labels None = same as tokens."""
    lengths = [len(d) for d in docs]
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]) if docs else np.zeros(0, np.int64)
    if labels is None:
        return tokens, None, offsets
    lab = [np.asarray(d if lb is None else lb, dtype=np.int64) for d, lb in zip(docs, labels)]
    return tokens, np.concatenate(lab) if lab else tokens, offsets


def pack_documents(
    docs: Sequence[Sequence[int]],
    seq_len: int,
    doc_mask: bool = True,
    labels: Sequence[Sequence[int] | None] | None = None,
) -> list[dict]:
    """All full sequences of a document list, in order (the reference the loaders agree with)."""
    tokens, lab, offsets = flatten(docs, labels)
    return [
        window_from_store(tokens, lab, offsets, k, seq_len, doc_mask)
        for k in range(num_windows(len(tokens), seq_len))
    ]


class StreamPacker:
    """Incremental packing for streamed documents; yields exactly what pack_documents would.

    Tracks, for the first token still buffered, which document (by stream row index) and offset it
    is, so a resumed stream can restart at that row and drop `head_offset` tokens."""

    def __init__(self, seq_len: int, doc_mask: bool):
        self.seq_len, self.doc_mask = seq_len, doc_mask
        self._tok: list[np.ndarray] = []
        self._lab: list[np.ndarray] = []
        self._rows: list[tuple[int, int]] = []  # (row index, length of the buffered part)
        self._first_is_start: list[bool] = []
        self._full_len: dict[int, int] = {}  # row index -> its full token count
        self._n = 0

    @property
    def head(self) -> tuple[int, int] | None:
        """(row index, tokens of that row already consumed) of the oldest buffered token."""
        if not self._rows:
            return None
        row, buffered = self._rows[0]
        return row, self._full_len.get(row, buffered) - buffered

    def add(self, row: int, ids: np.ndarray, labels: np.ndarray | None, skip: int = 0) -> Iterator[dict]:
        """Append a document (dropping its first `skip` tokens when resuming) and yield full sequences."""
        self._full_len[row] = len(ids)
        ids = np.asarray(ids[skip:], dtype=np.int64)
        lab = ids if labels is None else np.asarray(labels[skip:], dtype=np.int64)
        if len(ids) == 0:
            return
        self._tok.append(ids)
        self._lab.append(lab)
        self._rows.append((row, len(ids)))
        self._first_is_start.append(skip == 0)
        self._n += len(ids)
        s = self.seq_len
        while self._n >= s + 1:
            tok, lab_all = np.concatenate(self._tok), np.concatenate(self._lab)
            starts = np.zeros(len(tok), dtype=bool)
            pos = 0
            for (_, n), first in zip(self._rows, self._first_is_start):
                starts[pos] = first
                pos += n
            window = pack_window(tok[: s + 1], lab_all[: s + 1], starts[: s + 1], self.doc_mask)
            # Drop before yielding so `head` already points at the next window while the caller holds this one.
            self._drop(s)
            yield window

    def _drop(self, n: int) -> None:
        while n:
            row, m = self._rows[0]
            if m <= n:
                n -= m
                self._n -= m
                self._full_len.pop(row, None)
                del self._tok[0], self._lab[0], self._rows[0], self._first_is_start[0]
            else:
                self._tok[0], self._lab[0] = self._tok[0][n:], self._lab[0][n:]
                self._rows[0] = (row, m - n)
                self._first_is_start[0] = False
                self._n -= n
                n = 0
