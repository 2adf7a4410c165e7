"""Ring attention: key/value blocks travel around the ring group while each rank attends to them.

Forward: at step s rank i holds the keys of source rank (i - s) mod R; the transfer of the next block is
posted (batch_isend_irecv) before the current block is computed, so communication hides under compute
(NCCL runs the P2P on its own stream; `wait()` only makes the compute stream wait for it). Partial outputs
are merged by log-sum-exp, in float32 accumulators (`accum="float32"`) or, to halve their memory at
million-token lengths, in the input dtype (`accum="input"`: the merge math still runs in float32 inside
`lerp`, with one rounding per ring step).

Backward: keys travel the same way again; dQ accumulates locally. The dK/dV of a block is the sum of what
every rank computes against it: the owner keeps its own share locally, and the other ranks' shares are
summed along the ring in a partial that starts at the owner's neighbour and arrives home after R - 1
hops, each hop overlapping the next step's compute. Every rank posts send-to-next and receive-from-prev
together, in the same order, so no world size can deadlock.

With R == 1 (no ring) this is simply the local kernel on the block plan, with the same autograd.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from parallel.cp.batched import backward_squares, forward_squares
from parallel.cp.kernels import Kernel
from parallel.cp.plan import Block, group_squares, split_rows

Tensor = torch.Tensor

# Query rows per backward kernel call. The kernel's fp32 dQ workspace and the contiguous copies of the
# O and dO rows it takes grow with the rows of one call: at 512k tokens per GPU an unsplit block needs
# ~20 GiB of such temporaries, 64k-row calls ~2.5 GiB, and calls this large still run at the kernel's rate.
BACKWARD_ROWS = 65536
# Causal squares up to this many rows (short packed documents) share batched kernel calls (batched.py), on
# GPUs, where hundreds of small calls are launch-bound. On the CPU a call costs its arithmetic, which the
# padding would only add to: off (tests switch it on to cover the path).
BATCHED_SQUARE_ROWS = {"cuda": 4096, "cpu": 0}


class RingComm:
    """Send-to-next / receive-from-prev on a process group (None = a ring of one)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        if self.size > 1:
            rank = dist.get_rank(group)
            self.rank = rank
            self.next = dist.get_global_rank(group, (rank + 1) % self.size)
            self.prev = dist.get_global_rank(group, (rank - 1) % self.size)
        else:
            self.rank = 0

    def start(self, *send: Tensor) -> tuple[list[Tensor], list]:
        """Post the sends of `send` to the next rank and receives of same-shaped buffers from the previous.

        P2P needs contiguous memory; HF hands attention [B, H, S, D] views of [B, S, H, D] tensors, so such
        a view travels as its contiguous transpose instead of being copied first."""
        wire, flipped = [], []
        for t in send:
            flip = not t.is_contiguous() and t.transpose(1, 2).is_contiguous()
            wire.append(t.transpose(1, 2) if flip else t.contiguous())
            flipped.append(flip)
        recv = [torch.empty_like(t) for t in wire]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in wire]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recv]
        works = dist.batch_isend_irecv(ops)
        return [t.transpose(1, 2) if f else t for t, f in zip(recv, flipped)], works

    @staticmethod
    def wait(works: list) -> None:
        for w in works:
            w.wait()


def merge_block(out: Tensor, lse: Tensor, out_b: Tensor, lse_b: Tensor) -> None:
    """In-place stable log-sum-exp merge of a block into finite (out, lse):
    out += sigmoid(lse_b - lse) * (out_b - out);  lse -= logsigmoid(lse - lse_b)."""
    w = torch.sigmoid(lse_b - lse).unsqueeze(-1)
    out.lerp_(out_b.to(out.dtype), w.to(out.dtype))
    lse.sub_(torch.nn.functional.logsigmoid(lse - lse_b))


@functools.lru_cache(maxsize=256)
def _schedule(blocks: tuple[Block, ...], small: int, cap: int, fresh: bool, backward: bool):
    """How one step's plan runs: (batched groups of small causal squares, [(block, copy), ...] for the single
    calls, `copy` meaning the block is its rows' first). The same plan recurs in every layer's forward,
    recompute and backward of a batch, so it is worked out once (`small`: BATCHED_SQUARE_ROWS of the
    device; `cap`: BACKWARD_ROWS).

    Forward at step 0 (`fresh`): every query sees at least itself, so each run's own square comes first,
    then the blocks of earlier keys - every row is written whole by its square before any block (which may
    span runs) merges into it, and the merge never meets -inf. Backward cuts blocks into `cap` rows."""
    if backward:
        groups, rest = group_squares(split_rows(list(blocks), cap), small, cap)
        return tuple(map(tuple, groups)), [(b, False) for b in rest]
    if not fresh:  # (causal squares only occur at step 0: other ranks' keys are disjoint from our queries)
        return (), [(b, False) for b in blocks]
    groups, rest = group_squares(list(blocks), small, cap)
    written = [(b.q0, b.q1) for g in groups for b in g]
    singles = []
    for b in [b for b in rest if b.causal] + [b for b in rest if not b.causal]:
        singles.append((b, not any(lo < b.q1 and b.q0 < hi for lo, hi in written)))
        written.append((b.q0, b.q1))
    return tuple(map(tuple, groups)), singles


def _forward_blocks(
    q, k, v, blocks: list[Block], kernel: Kernel, scale: float, out: Tensor, lse: Tensor, fresh: bool
) -> None:
    """Attend and merge each block (`fresh`: step 0, the first block of a row range is copied)."""
    small = BATCHED_SQUARE_ROWS.get(q.device.type, 0)
    groups, singles = _schedule(tuple(blocks), small, BACKWARD_ROWS, fresh, False)
    for group in groups:
        forward_squares(q, k, v, group, kernel, scale, out, lse)
    for b, first in singles:
        o, lse_b = kernel.forward(
            q[:, :, b.q0 : b.q1], k[:, :, b.k0 : b.k1], v[:, :, b.k0 : b.k1], b.causal, scale
        )
        rows = slice(b.q0, b.q1)
        if first:
            out[:, :, rows].copy_(o)
            lse[:, :, rows].copy_(lse_b)
        else:
            merge_block(out[:, :, rows], lse[:, :, rows], o, lse_b)


def _backward_blocks(dout, q, k, v, out, lse, blocks, kernel, scale, dq, dk, dv) -> None:
    small = BATCHED_SQUARE_ROWS.get(q.device.type, 0)
    groups, singles = _schedule(tuple(blocks), small, BACKWARD_ROWS, False, True)
    for group in groups:
        backward_squares(dout, q, k, v, out, lse, group, kernel, scale, dq, dk, dv)
    for b, _ in singles:
        qs, ks = slice(b.q0, b.q1), slice(b.k0, b.k1)
        gq, gk, gv = kernel.backward(
            dout[:, :, qs],
            q[:, :, qs],
            k[:, :, ks],
            v[:, :, ks],
            out[:, :, qs],
            lse[:, :, qs],
            b.causal,
            scale,
        )
        dq[:, :, qs] += gq
        dk[:, :, ks] += gk
        dv[:, :, ks] += gv


def _per_batch(plans_step: list[list[Block]], batch: int) -> list[tuple[slice, list[Block]]]:
    """A step's plan is shared by the batch ([plan]) or given per batch row (packed documents)."""
    if len(plans_step) == 1:
        return [(slice(0, batch), plans_step[0])]
    return [(slice(i, i + 1), p) for i, p in enumerate(plans_step)]


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        comm: RingComm,
        plans: list[list[list[Block]]],
        kernel: Kernel,
        scale: float,
        kept: tuple[Tensor, Tensor] | None = None,
        accum: str = "float32",
    ):
        ctx.comm, ctx.plans, ctx.kernel, ctx.scale, ctx.accum = comm, plans, kernel, scale, accum
        if kept is not None:  # output and LSE of an earlier identical forward: only the graph is rebuilt
            out, lse = kept
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.mark_non_differentiable(lse)
            return out, lse
        b, h, s, d = q.shape
        stat = torch.promote_types(q.dtype, torch.float32)  # LSE in fp32 (fp64 for the reference)
        acc = _accum_dtype(q.dtype, accum)
        # [B, S, H, D] memory seen as [B, H, S, D]: the caller's transpose back to HF's layout is free, and
        # the tensor saved here is the one o_proj saves (no second [T, h] copy per layer).
        if acc == q.dtype:
            out = torch.empty(b, s, h, d, dtype=acc, device=q.device).transpose(1, 2)
        else:
            out = torch.empty(b, h, s, d, dtype=acc, device=q.device)
        lse = torch.empty((b, h, s), dtype=stat, device=q.device)
        cur_k, cur_v = k, v
        for step in range(comm.size):
            if step + 1 < comm.size:
                (nk, nv), works = comm.start(cur_k, cur_v)
            for rows, blocks in _per_batch(plans[step], b):
                _forward_blocks(
                    q[rows], cur_k[rows], cur_v[rows], blocks, kernel, scale, out[rows], lse[rows], step == 0
                )
            if step + 1 < comm.size:
                comm.wait(works)
                cur_k, cur_v = nk, nv
        if out.dtype != q.dtype:
            out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device).transpose(1, 2).copy_(out)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse=None):
        q, k, v, out, lse = ctx.saved_tensors
        comm, plans, kernel, scale = ctx.comm, ctx.plans, ctx.kernel, ctx.scale
        b, r = q.shape[0], comm.size
        dout = dout.contiguous()
        acc = _accum_dtype(q.dtype, ctx.accum)
        dq = torch.zeros_like(q, dtype=acc)
        own = torch.zeros((2, *k.shape), dtype=acc, device=k.device)  # this rank's share of its own block
        cur_k, cur_v = k, v
        incoming = (
            None  # (buffers, works): the partial dK/dV of the block we visit now, from the previous rank
        )
        for step in range(r):
            if step + 1 < r:
                (nk, nv), works = comm.start(cur_k, cur_v)
            part = own if step == 0 else torch.zeros((2, *k.shape), dtype=acc, device=k.device)
            for rows, blocks in _per_batch(plans[step], b):
                _backward_blocks(
                    dout[rows],
                    q[rows],
                    cur_k[rows],
                    cur_v[rows],
                    out[rows],
                    lse[rows],
                    blocks,
                    kernel,
                    scale,
                    dq[rows],
                    part[0][rows],
                    part[1][rows],
                )
            if step > 0:
                if incoming is not None:  # waited only now: the hop overlapped this step's compute
                    comm.wait(incoming[1])
                    part += incoming[0][0]
                # A partial holding a single share goes in the input dtype (it is one kernel result anyway).
                send = part.to(k.dtype) if step == 1 else part
                incoming = comm.start(send)
            if step + 1 < r:
                comm.wait(works)
                cur_k, cur_v = nk, nv
        if incoming is not None:  # what arrives after the last step is our own block, home
            comm.wait(incoming[1])
            own += incoming[0][0]
        return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype), None, None, None, None, None, None


def _accum_dtype(dtype: torch.dtype, accum: str) -> torch.dtype:
    if accum == "input":
        return dtype
    if accum == "float32":
        return torch.promote_types(dtype, torch.float32)  # fp64 stays fp64 (the test reference)
    raise ValueError(f"unknown ring accumulator {accum!r}; choose float32 or input")


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    comm: RingComm,
    plans: list[list[list[Block]]],
    kernel: Kernel,
    scale: float,
    kept: tuple[Tensor, Tensor] | None = None,
    with_lse: bool = False,
    accum: str = "float32",
):
    """q [B, H, S, D], k/v [B, Hkv, S, D] (local shards) -> out [B, H, S, D] (and the fp32 LSE [B, H, S]
    with `with_lse`); plans[step] from `CPContext`. `kept` = (out, lse) of an identical earlier forward;
    `accum`: float32 | input, the dtype of the merge and gradient accumulators."""
    out, lse = RingAttention.apply(q, k, v, comm, plans, kernel, scale, kept, accum)
    return (out, lse) if with_lse else out
