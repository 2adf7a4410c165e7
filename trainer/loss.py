"""Global loss normalisation and the gradient norm.

The loss of a step is sum(token CE) / (valid tokens in the whole global batch: every dp x cp rank and
every gradient-accumulation micro-batch). Each rank back-propagates local_sum * scale with
scale = fsdp_size / global_valid: FSDP averages gradients over its fsdp_size ranks, so the result is the
exact global mean whatever the layout - CP=N equals CP=1 to rounding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100


def count_valid(batches: list[dict[str, torch.Tensor]], dp_group: dist.ProcessGroup | None) -> int:
    """Valid (label != -100) tokens of the global batch. Every dp rank counts its full sequences."""
    n = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)], dtype=torch.float64)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(n, group=dp_group)
    return int(n.item())


def global_grad_norm(
    params: list[torch.nn.Parameter], pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """L2 norm of all gradients across every shard (FSDP, TP) and pipeline stage, as a plain scalar.

    Squares of the local shards are summed per (mesh, placements) group and all-reduced only over the mesh
    dimensions that shard them (replicated dimensions hold identical copies): one or two small collectives
    per group instead of one per tensor."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for key, grads in groups.items():
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        sq = torch.nn.utils.get_total_norm(local, 2.0, foreach=True).double().pow(2).to(device)
        if key is not None:
            mesh, placements = key
            for dim, placement in enumerate(placements):
                if not placement.is_replicate():  # Shard or FSDP+TP _StridedShard
                    dist.all_reduce(sq, group=mesh.get_group(dim))
        total += sq
    if pp_group is not None and dist.get_world_size(pp_group) > 1:  # stages hold disjoint parameters
        dist.all_reduce(total, group=pp_group)
    return total.sqrt().float()


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    if max_norm > 0 and torch.isfinite(total_norm):
        coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
