"""Ring attention: key/value blocks travel around the ring group while each rank attends to them.

Forward: at step s rank i holds the keys of source rank (i - s) mod R; the transfer of the next block is
posted (batch_isend_irecv) before the current block is computed, so communication hides under compute
(NCCL runs the P2P on its own stream; `wait()` only makes the compute stream wait for it). Partial outputs
are merged in float32 by log-sum-exp.

Backward: keys travel the same way again; dQ accumulates locally, while the dK/dV partial sums travel
*with* their key block and arrive at their owner after a full lap. Every rank posts send-to-next and
receive-from-prev together, in the same order, so no world size can deadlock.

With R == 1 (no ring) this is simply the local kernel on the block plan, with the same autograd.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.cp.kernels import Kernel
from parallel.cp.plan import Block

Tensor = torch.Tensor


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

    def start(self, send: Tensor) -> tuple[Tensor, list]:
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group),
            dist.P2POp(dist.irecv, recv, self.prev, self.group),
        ]
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(works: list) -> None:
        for w in works:
            w.wait()


def merge_block(out: Tensor, lse: Tensor, out_b: Tensor, lse_b: Tensor) -> None:
    """In-place stable log-sum-exp merge: out += sigmoid(lse_b - lse) * (out_b - out) (rows with no key stay 0)."""
    new_lse = torch.logaddexp(lse, lse_b)
    w = torch.exp(lse_b - new_lse).nan_to_num_(0.0)  # both -inf: no key seen yet in either part
    out.add_(w.unsqueeze(-1) * (out_b.to(out.dtype) - out))
    lse.copy_(new_lse)


def _forward_blocks(
    q, k, v, blocks: list[Block], kernel: Kernel, scale: float, out: Tensor, lse: Tensor, fresh: bool
) -> None:
    """Attend and merge each block; with `fresh` (nothing merged yet) a block's first write is a copy."""
    written: list[tuple[int, int]] = []
    for b in blocks:
        o, lse_b = kernel.forward(
            q[:, :, b.q0 : b.q1], k[:, :, b.k0 : b.k1], v[:, :, b.k0 : b.k1], b.causal, scale
        )
        rows = slice(b.q0, b.q1)
        if fresh and not any(lo < b.q1 and b.q0 < hi for lo, hi in written):
            out[:, :, rows].copy_(o)
            lse[:, :, rows].copy_(lse_b)
        else:
            merge_block(out[:, :, rows], lse[:, :, rows], o, lse_b)
        written.append((b.q0, b.q1))


def _backward_blocks(dout, q, k, v, out, lse, blocks, kernel, scale, dq, dk, dv) -> None:
    for b in blocks:
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
    def forward(ctx, q, k, v, comm: RingComm, plans: list[list[list[Block]]], kernel: Kernel, scale: float):
        b, h, s, d = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)  # merge in fp32 (fp64 for the reference)
        out = torch.zeros(b, h, s, d, dtype=acc, device=q.device)
        lse = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v]) if comm.size > 1 else None
        cur_k, cur_v = k, v
        for step in range(comm.size):
            if step + 1 < comm.size:
                nxt, works = comm.start(kv)
            for rows, blocks in _per_batch(plans[step], b):
                _forward_blocks(
                    q[rows], cur_k[rows], cur_v[rows], blocks, kernel, scale, out[rows], lse[rows], step == 0
                )
            if step + 1 < comm.size:
                comm.wait(works)
                kv = nxt
                cur_k, cur_v = kv[0], kv[1]
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.comm, ctx.plans, ctx.kernel, ctx.scale = comm, plans, kernel, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        comm, plans, kernel, scale = ctx.comm, ctx.plans, ctx.kernel, ctx.scale
        b = q.shape[0]
        dout = dout.contiguous()
        acc = torch.promote_types(q.dtype, torch.float32)
        dq = torch.zeros_like(q, dtype=acc)
        kv = torch.stack([k, v]) if comm.size > 1 else None
        cur_k, cur_v = k, v
        incoming = (
            None  # (buffer, works): dK/dV of the block we visit next, on its way from the previous rank
        )
        for step in range(comm.size):
            if step + 1 < comm.size:
                nxt, works = comm.start(kv)
            # This rank's contribution to the visiting block's dK/dV, accumulated in fp32.
            dkv = torch.zeros((2, *k.shape), dtype=acc, device=k.device)
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
                    dkv[0][rows],
                    dkv[1][rows],
                )
            if comm.size > 1:
                if incoming is not None:
                    # Waited only now, so the transfer overlapped this step's compute.
                    comm.wait(incoming[1])
                    dkv += incoming[0]
                # Pass the block's gradient on; after the last step what arrives is our own block, home
                # after a full lap.
                incoming = comm.start(dkv)
                if step + 1 < comm.size:
                    comm.wait(works)
                    kv = nxt
                    cur_k, cur_v = kv[0], kv[1]
        if incoming is not None:
            comm.wait(incoming[1])
            dkv = incoming[0]
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    comm: RingComm,
    plans: list[list[list[Block]]],
    kernel: Kernel,
    scale: float,
) -> Tensor:
    """q [B, H, S, D], k/v [B, Hkv, S, D] (local shards) -> out [B, H, S, D]; plans[step] from `CPContext`."""
    return RingAttention.apply(q, k, v, comm, plans, kernel, scale)
