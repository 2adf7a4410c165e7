"""Public context-parallel attention API: Ulysses, Ring and hybrid (Ulysses inside, Ring across).

The strategy is the choice of groups: ring only (`ulysses_group=None`), Ulysses only (`ring_group=None`),
or both (hybrid). A `CPContext` holds everything that depends only on the batch layout - the global
positions and document ids that each rank sees and the resulting block plans - so it is built once per
batch and shared by every layer.

Usage outside the trainer (flash-attn-like, q/k/v [batch, seq_local, heads, head_dim]):

    out = cp_attn_func(q, k, v, causal=True, ring_group=group)                       # ring
    out = cp_attn_func(q, k, v, ulysses_group=group)                                 # Ulysses
    out = cp_attn_func(q, k, v, ring_group=mesh["ring"].get_group(),
                       ulysses_group=mesh["ulysses"].get_group())                    # hybrid
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from parallel.cp.kernels import default_scale, select_kernel
from parallel.cp.plan import Block, plan_blocks
from parallel.cp.ring import RingComm, ring_attention
from parallel.cp.sharding import check_divisible, shard_index
from parallel.cp.spec import CPSpec
from parallel.cp.ulysses import check_heads, head_gather, replicate_kv_heads, seq_gather_qkv

Tensor = torch.Tensor
STRATEGIES = ("ring", "ulysses", "hybrid")


class CPContext:
    """Per-batch CP state shared by every attention layer.

    A plain class on purpose: FSDP's mixed-precision input casting rebuilds dataclasses (and the dicts and
    lists inside them) for every wrapped layer call, which would copy the plans and lose `keep`."""

    def __init__(
        self,
        ring: RingComm,
        ulysses_group,
        ulysses_size: int,
        plans,
        order,
        restore,
        seq_len: int,
        layout: str,
        causal: bool,
        kernel: str = "auto",
        accum: str = "float32",
    ):
        self.ring = ring
        self.accum = accum  # ring accumulators: float32 | input (ring.py)
        self.ulysses_group: dist.ProcessGroup | None = ulysses_group
        self.ulysses_size = ulysses_size
        self.plans: list[list[list[Block]]] = (
            plans  # [ring step][one shared plan | one per batch row][blocks]
        )
        self.order: list[tuple[int, int]] | None = (
            order  # after the Ulysses exchange: sort tokens by position
        )
        self.restore: list[tuple[int, int]] | None = restore  # the slices that undo `order`
        self.seq_len, self.layout, self.causal, self.kernel = seq_len, layout, causal, kernel
        # Attention outputs kept from the first forward of checkpointed layers (activation_checkpointing:
        # full_keep_attn), keyed by layer: the recompute in backward reuses them instead of attending again.
        self.keep: dict | None = None

    @property
    def cp_size(self) -> int:
        return self.ring.size * self.ulysses_size


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _group_positions(seq_len: int, ring_rank: int, ulysses: int, cp: int, layout: str) -> Tensor:
    """Global positions a ring rank's Ulysses group holds, in all-to-all (rank) order."""
    return torch.cat([shard_index(seq_len, cp, ring_rank * ulysses + u, layout) for u in range(ulysses)])


@functools.lru_cache(maxsize=64)
def _group_order(seq_len: int, ring_rank: int, ulysses: int, cp: int, layout: str):
    """(sorted positions, order, order slices, restore slices) of a ring rank's group - the same for every
    batch of a run, so built once instead of per forward (`_runs` walks the whole local sequence)."""
    pos = _group_positions(seq_len, ring_rank, ulysses, cp, layout)
    order = torch.argsort(pos)
    if bool((order == torch.arange(order.numel())).all()):
        return pos, order, None, None
    return pos[order], order, _runs(order), _runs(torch.argsort(order))


@functools.lru_cache(maxsize=16)
def _ring_comm(group: dist.ProcessGroup | None) -> RingComm:
    return RingComm(group)


@functools.lru_cache(maxsize=64)
def _static_plans(seq_len: int, ring: int, ulysses: int, ring_rank: int, layout: str, causal: bool):
    cp = ring * ulysses
    mine = _group_order(seq_len, ring_rank, ulysses, cp, layout)[0]
    plans = []
    for step in range(ring):
        theirs = _group_order(seq_len, (ring_rank - step) % ring, ulysses, cp, layout)[0]
        plans.append([plan_blocks(mine, theirs, causal=causal)])
    return plans


def _runs(index: Tensor) -> list[tuple[int, int]]:
    """A permutation as the source slices whose concatenation applies it (zigzag: 2 slices per rank).
    Slicing + one cat copies contiguous chunks, which is cheaper than a gather (index_select)."""
    idx = index.tolist()
    runs, start = [], 0
    for i in range(1, len(idx) + 1):
        if i == len(idx) or idx[i] != idx[i - 1] + 1:
            runs.append((idx[start], idx[i - 1] + 1))
            start = i
    return runs


def _permute(x: Tensor, runs: list[tuple[int, int]]) -> Tensor:
    return torch.cat([x[:, :, a:b] for a, b in runs], dim=2)


def _all_gather(x: Tensor, group) -> list[Tensor]:
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def build_context(
    seq_len: int,
    *,
    ring_group: dist.ProcessGroup | None = None,
    ulysses_group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    causal: bool = True,
    doc_ids: Tensor | None = None,
    kernel: str = "auto",
    accum: str = "float32",
) -> CPContext:
    """Build the per-batch context. `doc_ids` is this rank's shard [B, seq_local] of per-token document ids
    (packed sequences); attention never crosses documents. Collective over the CP group when doc_ids is given."""
    ring, uly = _size(ring_group), _size(ulysses_group)
    cp = ring * uly
    check_divisible(seq_len, cp, layout)
    r_rank = _rank(ring_group)
    mine_sorted, order, order_runs, restore_runs = _group_order(seq_len, r_rank, uly, cp, layout)
    if doc_ids is None:
        plans = _static_plans(seq_len, ring, uly, r_rank, layout, causal)
    else:
        # Document ids of every token each ring rank holds after the Ulysses exchange (tiny int tensors).
        docs = doc_ids.to(torch.int64)
        if uly > 1:
            docs = torch.cat(_all_gather(docs, ulysses_group), dim=1)
        ring_docs = _all_gather(docs, ring_group) if ring > 1 else [docs]
        plans = []
        my_docs = ring_docs[r_rank][:, order.to(docs.device)].cpu()
        for step in range(ring):
            src = (r_rank - step) % ring
            src_sorted, src_order, _, _ = _group_order(seq_len, src, uly, cp, layout)
            src_docs = ring_docs[src][:, src_order.to(docs.device)].cpu()
            rows = [
                plan_blocks(mine_sorted, src_sorted, my_docs[b], src_docs[b], causal)
                for b in range(my_docs.shape[0])
            ]
            plans.append(rows if any(r != rows[0] for r in rows) else rows[:1])
    return CPContext(
        ring=_ring_comm(ring_group),
        ulysses_group=ulysses_group if uly > 1 else None,
        ulysses_size=uly,
        plans=plans,
        order=order_runs,
        restore=restore_runs,
        seq_len=seq_len,
        layout=layout,
        causal=causal,
        kernel=kernel,
        accum=accum,
    )


def attend(
    q: Tensor, k: Tensor, v: Tensor, ctx: CPContext, scale: float | None = None, key: object = None
) -> Tensor:
    """CP attention on [B, H, S_local, D] tensors (SDPA layout); returns [B, H, S_local, D].
    `key` names the calling layer for `ctx.keep` (reuse of the attention output in a recompute)."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    kernel = select_kernel(ctx.kernel, q.device, q.dtype, q.shape[-1])
    group = ctx.ulysses_group
    if group is not None:
        check_heads(q.shape[1], k.shape[1], ctx.ulysses_size)
        k, v = replicate_kv_heads(k, ctx.ulysses_size), replicate_kv_heads(v, ctx.ulysses_size)
        q, k, v = seq_gather_qkv(q, k, v, group)
        if ctx.order is not None:
            q, k, v = (_permute(x, ctx.order) for x in (q, k, v))
    if ctx.keep is not None and key is not None:
        kept = ctx.keep.pop(key, None)  # second call = the checkpoint's recompute: attend no more
        out, lse = ring_attention(
            q, k, v, ctx.ring, ctx.plans, kernel, scale, kept, with_lse=True, accum=ctx.accum
        )
        if kept is None:
            ctx.keep[key] = (out.detach(), lse)
    else:
        out = ring_attention(q, k, v, ctx.ring, ctx.plans, kernel, scale, accum=ctx.accum)
    if group is not None:
        if ctx.restore is not None:
            out = _permute(out, ctx.restore)
        out = head_gather(out, group)
    return out


def cp_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    ring_group: dist.ProcessGroup | None = None,
    ulysses_group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    doc_ids: Tensor | None = None,
    kernel: str = "auto",
    context: CPContext | None = None,
    accum: str = "float32",
) -> Tensor:
    """Context-parallel attention on local shards, flash-attn style.

    q: [B, S_local, H, D]; k, v: [B, S_local, Hkv, D] - this rank's shard in `layout` (see sharding.py);
    the CP rank is ring_rank * ulysses_size + ulysses_rank. Returns this rank's output shard [B, S_local, H, D].
    Pass a prebuilt `context` to reuse plans across calls (e.g. every layer of a model). `accum`: the ring's
    accumulator dtype, float32 or input (see ring.py).
    """
    if context is None:
        seq_len = q.shape[1] * _size(ring_group) * _size(ulysses_group)
        context = build_context(
            seq_len,
            ring_group=ring_group,
            ulysses_group=ulysses_group,
            layout=layout,
            causal=causal,
            doc_ids=doc_ids,
            kernel=kernel,
            accum=accum,
        )
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), context, softmax_scale)
    return out.transpose(1, 2)


def groups_for_strategy(strategy: str, cp_group=None, ring_group=None, ulysses_group=None):
    """(ring_group, ulysses_group) for a strategy: ring/ulysses use the whole CP group, hybrid both sub-groups."""
    if strategy == "ring":
        return cp_group, None
    if strategy == "ulysses":
        return None, cp_group
    if strategy == "hybrid":
        return ring_group, ulysses_group
    raise ValueError(f"unknown CP strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def apply_cp(
    stage,
    ring_group: dist.ProcessGroup | None,
    ulysses_group: dist.ProcessGroup | None,
    layout: str = "zigzag",
    kernel: str = "auto",
    causal: bool = True,
    accum: str = "float32",
) -> None:
    """Attach CP attention to a model stage: each forward builds one `CPContext` for all its layers."""

    def make_context(seq_len: int, doc_ids: Tensor | None) -> CPContext:
        return build_context(
            seq_len,
            ring_group=ring_group,
            ulysses_group=ulysses_group,
            layout=layout,
            causal=causal,
            doc_ids=doc_ids,
            kernel=kernel,
            accum=accum,
        )

    def max_position(local: Tensor) -> Tensor:
        top = local.reshape(1).clone()
        for group in (ulysses_group, ring_group):
            if _size(group) > 1:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        return top[0]

    stage.cp = CPSpec(
        make_context=make_context,
        seq_shards=_size(ring_group) * _size(ulysses_group),
        max_position=max_position,
    )
