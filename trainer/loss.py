"""Global loss normalisation and the gradient norm.

The loss of a step is sum(token CE) / (valid tokens in the whole global batch: every dp x cp rank and
every gradient-accumulation micro-batch). Each rank back-propagates local_sum * scale with
scale = fsdp_size / global_valid: FSDP averages gradients over its fsdp_size ranks, so the result is the
exact global mean whatever the layout - CP=N equals CP=1 to rounding.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100
log = logging.getLogger("longctx")


def count_valid(
    batches: list[dict[str, torch.Tensor]], dp_group: dist.ProcessGroup | None, device: torch.device
) -> int:
    """Valid (label != -100) tokens of the global batch. Every dp rank counts its full sequences."""
    n = torch.tensor(
        [sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)], dtype=torch.float64, device=device
    )
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(n, group=dp_group)
    return int(n.item())


def mean_loss(local_sum: torch.Tensor, fsdp_size: int, *groups: dist.ProcessGroup | None) -> float:
    """The step's loss from each rank's share local_sum * fsdp_size / global_valid: summed over the
    groups (dp x cp, and pp where only the last stage has a loss), divided by fsdp_size."""
    total = local_sum.detach().clone()
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
    return (total / fsdp_size).item()


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def skip_nonfinite(
    local_loss: float,
    loss: float,
    grad_norm: float,
    step: int,
    skipped: int,
    limit: int,
    device: torch.device,
) -> bool:
    """Collective. False if the step is finite; True if it must be skipped. Raises NonFiniteError, naming the
    step and the ranks whose own loss share was non-finite (every rank when only the global values are),
    once `limit` steps have been skipped."""
    flag = torch.tensor([float(_finite(local_loss))], device=device)
    flags = [torch.zeros_like(flag) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, flag)
    bad = [r for r, f in enumerate(flags) if f.item() == 0]
    if not bad and _finite(loss) and _finite(grad_norm):
        return False
    ranks = bad or list(range(len(flags)))
    if skipped >= limit:
        from trainer.errors import NonFiniteError  # errors imports the checkpoint and data stacks

        raise NonFiniteError(
            f"non-finite loss or grad norm at step {step} on rank(s) {ranks} (loss {loss}, grad_norm "
            f"{grad_norm}); training.skip_nonfinite={limit} skips exhausted"
        )
    log.warning("skipping step %d: non-finite loss/grad norm on rank(s) %s", step, ranks)
    return True


def global_grad_norm(
    params: list[torch.nn.Parameter],
    pp_group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """L2 norm of all gradients across every shard (FSDP, TP) and pipeline stage, as a plain scalar.

    Squares of the local shards are summed per (mesh, placements) group and all-reduced only over the mesh
    dimensions that shard them (replicated dimensions hold identical copies): one or two small collectives
    per group instead of one per tensor. `device` is where the collectives run (the training device): with
    FSDP CPU offload the gradients live on the host, which an NCCL group cannot reduce."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    if device is None:
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
