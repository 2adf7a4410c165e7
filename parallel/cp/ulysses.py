"""Ulysses: all-to-all from sequence-sharded [S/U tokens, H heads] to head-sharded [S tokens, H/U heads].

After the exchange each rank attends over its group's whole sequence for a subset of heads, then a
second all-to-all restores the sequence sharding. Per-rank traffic stays constant when sequence length
and GPU count grow together, but the degree is capped by the number of heads.

GQA/MQA: when there are fewer kv heads than the degree, each kv head is replicated so that rank u
receives the kv head its query heads use (query heads [u*H/U, (u+1)*H/U) -> kv head u*Hkv/U); autograd
sums the replicas' gradients back. Query heads not divisible by the degree cannot be split: use hybrid.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def _a2a_heads_to_seq(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """[B, H, S_local, D] sharded by sequence -> [B, H/U, U*S_local, D] (rank-order concatenation)."""
    u = dist.get_world_size(group)
    b, h, s, d = x.shape
    send = x.reshape(b, u, h // u, s, d).transpose(0, 1).contiguous()  # [U, B, H/U, S, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] = rank j's tokens for my heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // u, u * s, d)


def _a2a_seq_to_heads(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Inverse of `_a2a_heads_to_seq`: [B, H/U, U*S_local, D] -> [B, H, S_local, D]."""
    u = dist.get_world_size(group)
    b, hu, us, d = x.shape
    s = us // u
    send = x.reshape(b, hu, u, s, d).permute(2, 0, 1, 3, 4).contiguous()  # [U, B, H/U, S, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] = head group j of my tokens
    return recv.transpose(0, 1).reshape(b, u * hu, s, d)


class _SeqGatherQKV(torch.autograd.Function):
    """q, k and v in one all-to-all (one message per peer instead of three): the heads each destination
    rank gets from q, k and v are stacked, so one exchange of the stack is three exchanges in one."""

    @staticmethod
    def forward(ctx, q, k, v, group):
        u = dist.get_world_size(group)
        b, _, s, d = q.shape
        ctx.group, ctx.split = group, tuple(x.shape[1] // u for x in (q, k, v))
        # Per destination rank j: its q heads, then its k heads, then its v heads.
        stacked = torch.cat([x.reshape(b, u, x.shape[1] // u, s, d) for x in (q, k, v)], dim=2)
        both = _a2a_heads_to_seq(stacked.reshape(b, u * sum(ctx.split), s, d), group)
        return tuple(x.contiguous() for x in both.split(ctx.split, dim=1))

    @staticmethod
    def backward(ctx, gq, gk, gv):
        u = dist.get_world_size(ctx.group)
        full = _a2a_seq_to_heads(torch.cat([gq, gk, gv], dim=1), ctx.group)  # [B, U * Hc, S, D]
        b, _, s, d = full.shape
        parts = full.reshape(b, u, sum(ctx.split), s, d).split(ctx.split, dim=2)
        return (*(x.reshape(b, -1, s, d) for x in parts), None)


class _HeadGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _a2a_seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, g):
        return _a2a_heads_to_seq(g.contiguous(), ctx.group), None


def check_heads(q_heads: int, kv_heads: int, degree: int) -> None:
    if q_heads % degree:
        raise ValueError(
            f"Ulysses degree {degree} does not divide the {q_heads} query heads on this rank; use "
            f"parallel.cp_strategy=hybrid with parallel.ulysses dividing {q_heads} (the rest goes to the ring)"
        )
    if kv_heads % degree and degree % kv_heads:
        raise ValueError(
            f"{kv_heads} kv heads can neither be split over nor replicated to Ulysses degree {degree}"
        )


def replicate_kv_heads(k: Tensor, degree: int) -> Tensor:
    """Repeat kv heads up to the Ulysses degree when there are fewer of them (GQA/MQA)."""
    hkv = k.shape[1]
    return k if hkv >= degree else k.repeat_interleave(degree // hkv, dim=1)


def seq_gather_qkv(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable all-to-all of q, k and v together (k/v already replicated to the degree)."""
    return _SeqGatherQKV.apply(q, k, v, group)


def head_gather(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Differentiable all-to-all: head-sharded -> sequence-sharded."""
    return _HeadGather.apply(x, group)
