"""Short packed documents in one kernel call: small causal squares of a block plan, padded to a common
length and stacked along the batch dimension.

A sequence packed with many short documents plans one causal square per document run; one kernel call
each makes such a step launch-bound (hundreds of calls of a few hundred tokens). `plan.group_squares`
picks squares of similar length and this module runs each group as one batched call of the same kernel.
Padding repeats a square's last query row and last key row: under the top-left causal mask no real query
sees a padded key (they all come after it); a padded query's scores are copies of the last real row's,
so its softmax stays finite, and its results are dropped; in backward its dO is zero, so it adds nothing
to dK/dV.
"""

from __future__ import annotations

import functools

import torch

from parallel.cp.kernels import Kernel
from parallel.cp.plan import Block

Tensor = torch.Tensor


@functools.lru_cache(maxsize=256)
def _indices(group: tuple[Block, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Row indices [n, L] of the padded query and key blocks, and which entries are real (cached: the same
    groups recur in every layer's forward, recompute and backward of a batch)."""
    lengths = torch.tensor([b.q1 - b.q0 for b in group])
    steps = torch.arange(int(lengths.max()))
    last = torch.minimum(steps[None, :], lengths[:, None] - 1)  # padding repeats the last row
    q_idx = torch.tensor([b.q0 for b in group])[:, None] + last
    k_idx = torch.tensor([b.k0 for b in group])[:, None] + last
    valid = steps[None, :] < lengths[:, None]
    return q_idx.to(device), k_idx.to(device), valid.to(device)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """[B, H, S, ...] rows idx [n, L] -> [B*n, H, L, ...] (one batch entry per square)."""
    g = x[:, :, idx].movedim(2, 1)  # [B, n, H, L, ...]
    return g.reshape(-1, *g.shape[2:])


def _real_rows(y: Tensor, batch: int, valid: Tensor) -> Tensor:
    """Inverse of _gather on the real rows: [B*n, H, L, ...] -> [B, H, rows, ...]."""
    y = y.reshape(batch, -1, *y.shape[1:]).movedim(1, 2)  # [B, H, n, L, ...]
    return y[:, :, valid]


def forward_squares(q, k, v, group: list[Block], kernel: Kernel, scale: float, out: Tensor, lse: Tensor):
    """Step 0: the group's rows get their first (and own) block's output and LSE."""
    q_idx, k_idx, valid = _indices(tuple(group), q.device)
    o, lse_b = kernel.forward(_gather(q, q_idx), _gather(k, k_idx), _gather(v, k_idx), True, scale)
    rows = q_idx[valid]
    out[:, :, rows] = _real_rows(o, q.shape[0], valid).to(out.dtype)
    lse[:, :, rows] = _real_rows(lse_b, q.shape[0], valid)


def backward_squares(dout, q, k, v, out, lse, group: list[Block], kernel: Kernel, scale: float, dq, dk, dv):
    q_idx, k_idx, valid = _indices(tuple(group), q.device)
    batch, n = q.shape[0], valid.shape[0]
    d_out = _gather(dout, q_idx)
    d_out.view(batch, n, *d_out.shape[1:]).masked_fill_(~valid[None, :, None, :, None], 0)
    gq, gk, gv = kernel.backward(
        d_out,
        _gather(q, q_idx),
        _gather(k, k_idx),
        _gather(v, k_idx),
        _gather(out, q_idx),
        _gather(lse, q_idx),
        True,
        scale,
    )
    dq.index_add_(2, q_idx[valid], _real_rows(gq, batch, valid).to(dq.dtype))
    dk.index_add_(2, k_idx[valid], _real_rows(gk, batch, valid).to(dk.dtype))
    dv.index_add_(2, k_idx[valid], _real_rows(gv, batch, valid).to(dv.dtype))
