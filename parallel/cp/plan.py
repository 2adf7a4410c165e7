"""Block plans: which (query block, key block) pairs a rank computes, and with which mask.

Every CP strategy reduces to "attend my queries to this block of keys": the ring visits one source
rank's keys per step, Ulysses sees the whole sequence at once. Given the *global* positions and the
document ids of the local queries and of the visiting keys, `plan_blocks` cuts the work into dense
rectangles that are either fully visible or top-left causal - the only two masks the fused kernels
(cuDNN, flash) express. Packed documents therefore need no mask tensor at all: a query run only meets
key runs of its own document, so attention can never cross a document boundary.

For zigzag without documents this reproduces the classic schedule: one causal block at step 0, then
either "all queries x first key chunk" or "second query chunk x all keys" - one kernel call per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Block:
    """Local rows [q0, q1) attend to local key rows [k0, k1); causal = top-left aligned triangle."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool


@dataclass(frozen=True)
class Run:
    """Local rows [start, end) hold consecutive global positions [pos, pos + end - start) of one document."""

    start: int
    end: int
    pos: int
    doc: int


def find_runs(pos: torch.Tensor, doc: torch.Tensor | None) -> list[Run]:
    """Maximal local ranges with consecutive positions and one document id."""
    pos = pos.cpu()
    n = pos.numel()
    brk = pos[1:] != pos[:-1] + 1
    if doc is not None:
        doc = doc.cpu()
        brk |= doc[1:] != doc[:-1]
    starts = [0, *(torch.nonzero(brk).flatten() + 1).tolist()]
    ends = [*starts[1:], n]
    pos_l = pos[starts].tolist()
    doc_l = doc[starts].tolist() if doc is not None else [0] * len(starts)
    return [Run(s, e, p, d) for s, e, p, d in zip(starts, ends, pos_l, doc_l)]


def _pair_blocks(q: Run, k: Run, causal: bool) -> list[Block]:
    if q.doc != k.doc:
        return []
    a, b = q.pos, q.pos + (q.end - q.start)
    c, e = k.pos, k.pos + (k.end - k.start)
    if not causal:
        return [Block(q.start, q.end, k.start, k.end, False)]
    blocks = []
    lo, hi = c, min(e, a)  # keys strictly before every query of the run: fully visible
    if lo < hi:
        blocks.append(Block(q.start, q.end, k.start + lo - c, k.start + hi - c, False))
    lo, hi = max(c, a), min(e, b)  # keys overlapping the query run: a causal square, then full below it
    if lo < hi:
        blocks.append(Block(q.start + lo - a, q.start + hi - a, k.start + lo - c, k.start + hi - c, True))
        if hi < b:
            blocks.append(Block(q.start + hi - a, q.end, k.start + lo - c, k.start + hi - c, False))
    return blocks  # keys after the run are invisible


def _merge_full(blocks: list[Block], by_keys: bool) -> list[Block]:
    """Fuse full blocks that share their key (or query) range and are adjacent in the other."""

    def key(b: Block):
        return (b.causal, b.k0, b.k1, b.q0) if by_keys else (b.causal, b.q0, b.q1, b.k0)

    out: list[Block] = []
    for b in sorted(blocks, key=key):
        p = out[-1] if out else None
        if p is not None and not b.causal and not p.causal:
            if by_keys and (p.k0, p.k1) == (b.k0, b.k1) and p.q1 == b.q0:
                out[-1] = Block(p.q0, b.q1, b.k0, b.k1, False)
                continue
            if not by_keys and (p.q0, p.q1) == (b.q0, b.q1) and p.k1 == b.k0:
                out[-1] = Block(b.q0, b.q1, p.k0, b.k1, False)
                continue
        out.append(b)
    return out


def plan_blocks(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    causal: bool = True,
) -> list[Block]:
    """Dense blocks covering exactly the allowed (query, key) pairs; positions are global indices."""
    sq, sk = q_pos.numel(), k_pos.numel()
    if q_doc is None and k_doc is None:
        if not causal:
            return [Block(0, sq, 0, sk, False)]
        monotonic = bool((q_pos[1:] > q_pos[:-1]).all())
        # Same tokens in increasing order: the local triangle *is* the global causal mask.
        if sq == sk and monotonic and torch.equal(q_pos, k_pos):
            return [Block(0, sq, 0, sk, True)]
    blocks = [
        b
        for qr in find_runs(q_pos, q_doc)
        for kr in find_runs(k_pos, k_doc)
        for b in _pair_blocks(qr, kr, causal)
    ]
    return _merge_full(_merge_full(blocks, by_keys=True), by_keys=False)


def split_rows(blocks: list[Block], max_rows: int) -> list[Block]:
    """The same (query, key) pairs in blocks of at most `max_rows` query rows. A causal square's lower
    piece [a, b) sees the keys before it in full and its own diagonal as a smaller causal square."""
    out: list[Block] = []
    for b in blocks:
        for a in range(b.q0, b.q1, max_rows):
            e = min(a + max_rows, b.q1)
            if not b.causal:
                out.append(Block(a, e, b.k0, b.k1, False))
                continue
            lo = b.k0 + (a - b.q0)  # the piece's own diagonal starts here
            if lo > b.k0:
                out.append(Block(a, e, b.k0, lo, False))
            out.append(Block(a, e, lo, lo + (e - a), True))
    return out


MAX_SQUARES_PER_CALL = 1024  # keeps a batched call's batch dimension far below the kernels' grid limit


def padded_shape(count: int, rows: int) -> tuple[int, int]:
    """(entries, rows) of the batched call for `count` squares of at most `rows` rows: both rounded up to
    powers of two, so a run meets a bounded set of kernel shapes (cuDNN builds and keeps a plan per shape)."""
    return 1 << (count - 1).bit_length(), 1 << (rows - 1).bit_length()


def group_squares(
    blocks: list[Block], max_rows: int, max_total: int
) -> tuple[list[list[Block]], list[Block]]:
    """Small causal squares that can share one batched kernel call, and the other blocks (in plan order,
    then the small squares left alone). Squares of at most `max_rows` rows are grouped by their power-of-two
    length class (L/2, L] - padding to L costs at most 4x a group's own causal work, which at these lengths is
    launch overhead anyway - at least two and at most max_total // L per group (padded entries included)."""
    classes: dict[int, list[Block]] = {}
    rest: list[Block] = []
    for b in blocks:
        if b.causal and b.q1 - b.q0 <= max_rows:
            classes.setdefault(padded_shape(1, b.q1 - b.q0)[1], []).append(b)
        else:
            rest.append(b)
    groups: list[list[Block]] = []
    for rows, members in sorted(classes.items()):
        cap = min(MAX_SQUARES_PER_CALL, 1 << (max(1, max_total // rows).bit_length() - 1))
        for i in range(0, len(members), cap):
            chunk = members[i : i + cap]
            if len(chunk) >= 2:
                groups.append(chunk)
            else:
                rest.extend(chunk)
    return groups, rest


def block_mask(blocks: list[Block], sq: int, sk: int) -> torch.Tensor:
    """Dense boolean mask of a plan (tests and debugging only)."""
    m = torch.zeros(sq, sk, dtype=torch.bool)
    for b in blocks:
        sub = torch.ones(b.q1 - b.q0, b.k1 - b.k0, dtype=torch.bool)
        m[b.q0 : b.q1, b.k0 : b.k1] |= sub.tril() if b.causal else sub
    return m
