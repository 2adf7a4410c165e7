"""Short packed documents in one kernel call: small causal squares of a block plan, padded to a common
length and stacked along the batch dimension.

A sequence packed with many short documents plans one causal square per document run; one kernel call
each makes such a step launch-bound (hundreds of calls of a few hundred tokens). `plan.group_squares`
picks squares of one power-of-two length class and this module runs each group as one batched call of the
same kernel, padded to a power-of-two shape (`plan.padded_shape`: a bounded set of shapes, each planned
once by cuDNN). Padding repeats a square's last query row and last key row, and padding entries repeat
the first square: under the top-left causal mask no real query sees a padded key (they all come after
it); a padded query's scores are copies of real ones, so its softmax stays finite, and its results are
dropped; in backward its dO is zero, so it adds nothing to dK/dV. Every index is built once per group on
the host and selected with index_select / index_add on the device: no device-to-host sync per call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from parallel.cp.kernels import Kernel
from parallel.cp.plan import Block, padded_shape

Tensor = torch.Tensor


class _Rows(NamedTuple):
    q_idx: Tensor  # [N, L] query rows of each padded entry
    k_idx: Tensor  # [N, L] key rows
    valid: Tensor  # [N, L] real (not padding)
    flat: Tensor  # positions of the real entries in the flattened [N * L]
    q_rows: Tensor  # their query rows, in that order
    k_rows: Tensor  # their key rows


@functools.lru_cache(maxsize=256)
def _rows(group: tuple[Block, ...], device: torch.device) -> _Rows:
    """Cached: the same groups recur in every layer's forward, recompute and backward of a batch."""
    lengths = [b.q1 - b.q0 for b in group]
    entries, length = padded_shape(len(group), max(lengths))
    pad = entries - len(group)
    span = torch.tensor(lengths + [lengths[0]] * pad)  # padding entries repeat the first square
    real = torch.tensor(lengths + [0] * pad)
    steps = torch.arange(length)
    last = torch.minimum(steps[None, :], span[:, None] - 1)  # padding rows repeat the last row
    q_idx = torch.tensor([b.q0 for b in group] + [group[0].q0] * pad)[:, None] + last
    k_idx = torch.tensor([b.k0 for b in group] + [group[0].k0] * pad)[:, None] + last
    valid = steps[None, :] < real[:, None]
    flat = valid.flatten().nonzero().squeeze(1)
    rows = _Rows(q_idx, k_idx, valid, flat, q_idx.flatten()[flat], k_idx.flatten()[flat])
    return _Rows(*(t.to(device) for t in rows))


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """[B, H, S, ...] rows idx [N, L] -> [B*N, H, L, ...] (one batch entry per square)."""
    g = x[:, :, idx].movedim(2, 1)  # [B, N, H, L, ...]
    return g.reshape(-1, *g.shape[2:])


def _real_rows(y: Tensor, batch: int, flat: Tensor) -> Tensor:
    """Inverse of _gather on the real entries: [B*N, H, L, ...] -> [B, H, rows, ...]."""
    y = y.reshape(batch, -1, *y.shape[1:]).movedim(1, 2)  # [B, H, N, L, ...]
    return y.flatten(2, 3).index_select(2, flat)


def forward_squares(
    q, k, v, group: tuple[Block, ...], kernel: Kernel, scale: float, out: Tensor, lse: Tensor
):
    """Step 0: the group's rows get their own block's output and LSE (their first block)."""
    r = _rows(group, q.device)
    o, lse_b = kernel.forward(_gather(q, r.q_idx), _gather(k, r.k_idx), _gather(v, r.k_idx), True, scale)
    out[:, :, r.q_rows] = _real_rows(o, q.shape[0], r.flat).to(out.dtype)
    lse[:, :, r.q_rows] = _real_rows(lse_b, q.shape[0], r.flat)


def backward_squares(
    dout, q, k, v, out, lse, group: tuple[Block, ...], kernel: Kernel, scale: float, dq, dk, dv
):
    r = _rows(group, q.device)
    batch, entries = q.shape[0], r.valid.shape[0]
    d_out = _gather(dout, r.q_idx)
    d_out.view(batch, entries, *d_out.shape[1:]).masked_fill_(~r.valid[None, :, None, :, None], 0)
    gq, gk, gv = kernel.backward(
        d_out,
        _gather(q, r.q_idx),
        _gather(k, r.k_idx),
        _gather(v, r.k_idx),
        _gather(out, r.q_idx),
        _gather(lse, r.q_idx),
        True,
        scale,
    )
    dq.index_add_(2, r.q_rows, _real_rows(gq, batch, r.flat).to(dq.dtype))
    dk.index_add_(2, r.k_rows, _real_rows(gk, batch, r.flat).to(dk.dtype))
    dv.index_add_(2, r.k_rows, _real_rows(gv, batch, r.flat).to(dv.dtype))
