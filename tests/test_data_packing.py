"""Packing invariants: no token lost or duplicated, next-token labels, doc-mask positions/ids/labels."""

import numpy as np
import pytest

from trainer.data.packing import IGNORE, StreamPacker, flatten, num_windows, pack_documents


def _docs(seed=0, n=40, max_len=90):
    rng = np.random.default_rng(seed)
    # Token values encode (doc, index) so any misplaced token is visible.
    return [list(1000 * d + np.arange(int(rng.integers(1, max_len)))) for d in range(n)]


@pytest.mark.parametrize("seq_len", [1, 7, 32, 200])
@pytest.mark.parametrize("doc_mask", [True, False])
def test_tokens_and_labels(seq_len, doc_mask):
    docs = _docs()
    stream, _, offsets = flatten(docs)
    seqs = pack_documents(docs, seq_len, doc_mask)
    n = num_windows(len(stream), seq_len)
    assert len(seqs) == n and n > 0
    inputs = np.concatenate([s["input_ids"] for s in seqs])
    targets = np.concatenate([s["labels"] for s in seqs])
    # Inputs tile the stream without gaps or repeats; the dropped tail is shorter than one sequence.
    np.testing.assert_array_equal(inputs, stream[: n * seq_len])
    assert len(stream) - 1 - n * seq_len < seq_len
    last_of_doc = np.zeros(len(stream), dtype=bool)
    last_of_doc[offsets[1:] - 1] = True
    expected = stream[1 : n * seq_len + 1].copy()
    if doc_mask:
        expected[last_of_doc[: n * seq_len]] = IGNORE
    np.testing.assert_array_equal(targets, expected)
    for s in seqs:
        for k in s:
            assert s[k].shape == (seq_len,) and s[k].dtype == np.int64


@pytest.mark.parametrize("seq_len", [5, 64])
def test_positions_and_doc_ids(seq_len):
    docs = _docs(seed=1)
    stream, _, offsets = flatten(docs)
    doc_of = np.repeat(np.arange(len(docs)), np.diff(offsets))
    idx_in_doc = np.concatenate([np.arange(len(d)) for d in docs])
    for k, s in enumerate(pack_documents(docs, seq_len, doc_mask=True)):
        sl = slice(k * seq_len, (k + 1) * seq_len)
        d, pos = doc_of[sl], idx_in_doc[sl]
        # doc_ids number the document segments of this sequence from 0.
        np.testing.assert_array_equal(s["doc_ids"], np.unique(d, return_inverse=True)[1])
        # Positions restart at each document start; a continued document restarts at the sequence start.
        first = pos[0]
        exp = np.where(d == d[0], pos - first, pos)
        np.testing.assert_array_equal(s["position_ids"], exp)
    for s in pack_documents(docs, seq_len, doc_mask=False):
        np.testing.assert_array_equal(s["position_ids"], np.arange(seq_len))
        assert not s["doc_ids"].any()


def test_label_values_are_shifted_and_masked():
    docs = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    labels = [[IGNORE, IGNORE, 3, 4], None, [IGNORE, 9, IGNORE, 11, 12]]
    (a, b) = pack_documents(docs, 5, doc_mask=True, labels=labels)
    np.testing.assert_array_equal(a["input_ids"], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(a["labels"], [IGNORE, 3, 4, IGNORE, 6])
    np.testing.assert_array_equal(a["position_ids"], [0, 1, 2, 3, 0])
    np.testing.assert_array_equal(a["doc_ids"], [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(b["input_ids"], [6, 7, 8, 9, 10])
    np.testing.assert_array_equal(b["labels"], [7, IGNORE, 9, IGNORE, 11])
    np.testing.assert_array_equal(b["position_ids"], [0, 1, 0, 1, 2])
    np.testing.assert_array_equal(b["doc_ids"], [0, 0, 1, 1, 1])
    (a2, b2) = pack_documents(docs, 5, doc_mask=False, labels=labels)
    np.testing.assert_array_equal(a2["labels"], [IGNORE, 3, 4, 5, 6])


@pytest.mark.parametrize("doc_mask", [True, False])
def test_stream_packer_matches_and_resumes(doc_mask):
    docs = _docs(seed=2, n=30, max_len=50)
    seq_len = 16
    ref = pack_documents(docs, seq_len, doc_mask)
    packer, out, heads = StreamPacker(seq_len, doc_mask), [], []
    for i, d in enumerate(docs):
        for s in packer.add(i, np.asarray(d), None):
            out.append(s)
            heads.append(packer.head or (i + 1, 0))
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # Restarting from any recorded head reproduces the rest of the sequence list.
    for j in (0, 3, len(heads) // 2, len(heads) - 2):
        row, off = heads[j]
        p2, rest = StreamPacker(seq_len, doc_mask), []
        for i in range(row, len(docs)):
            rest.extend(p2.add(i, np.asarray(docs[i]), None, off if i == row else 0))
        assert len(rest) == len(ref) - j - 1
        for a, b in zip(rest, ref[j + 1 :]):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
