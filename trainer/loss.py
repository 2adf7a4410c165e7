"""Global loss normalisation and the gradient norm.

The loss of a step is sum(token CE) / (valid tokens in the whole global batch: every dp x cp rank and
every gradient-accumulation micro-batch). Each rank back-propagates local_sum * scale with
scale = fsdp_size / global_valid: FSDP averages gradients over its fsdp_size ranks, so the result is the
exact global mean whatever the layout - CP=N equals CP=1 to rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100
log = logging.getLogger("longctx")


def count_valid(
    batches: list[dict[str, torch.Tensor]], dp_group: dist.ProcessGroup | None, device: torch.device
) -> torch.Tensor:
    """Valid (label != -100) tokens of the global batch, as a float64 tensor on `device` (no host read:
    the loss scale derived from it stays on the device). Every dp rank counts its full sequences."""
    local = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches)
    n = torch.as_tensor(local, dtype=torch.float64).to(device).reshape(1)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(n, group=dp_group)
    return n[0]


def loss_scale(global_valid: torch.Tensor, fsdp_size: int) -> torch.Tensor:
    """What each rank multiplies its token-loss sum by: fsdp_size / global valid tokens."""
    return fsdp_size / global_valid.clamp(min=1)


@dataclass
class StepValues:
    """The host-side numbers of one step, read in one go (see `agree_step`)."""

    loss: float
    grad_norm: float
    bad_ranks: list[int]  # ranks whose own loss share was non-finite

    @property
    def finite(self) -> bool:
        return not self.bad_ranks and _finite(self.loss) and _finite(self.grad_norm)


def agree_step(
    local_sum: torch.Tensor, grad_norm: torch.Tensor | float, fsdp_size: int, counts_loss: bool
) -> StepValues:
    """Collective over all ranks; the step's only host read. One all-reduce of [loss share, one flag per
    rank] gives the global loss (summed over dp x cp and the pipeline's last stage; `counts_loss` is
    False on tensor-parallel replicas, which hold the same share) and the ranks whose own share was
    non-finite; the (already global) grad norm travels with it to the host."""
    world, rank = dist.get_world_size(), dist.get_rank()
    share = local_sum.detach().double().reshape(())
    vec = torch.zeros(world + 1, dtype=torch.float64, device=share.device)
    vec[0] = share if counts_loss else torch.where(share.isfinite(), 0.0, share)
    vec[1 + rank] = (~share.isfinite()).double()
    dist.all_reduce(vec)
    norm = torch.as_tensor(grad_norm, dtype=torch.float64).to(share.device).reshape(1)
    values = torch.cat([vec, norm]).tolist()
    bad = [r for r in range(world) if values[1 + r]]
    return StepValues(values[0] / fsdp_size, values[-1], bad)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def skip_nonfinite(values: StepValues, step: int, skipped: int, limit: int) -> bool:
    """False if the step is finite; True if it must be skipped. Raises NonFiniteError, naming the step and
    the ranks whose own loss share was non-finite (every rank when only the global values are), once
    `limit` steps have been skipped. Host-only: every rank decides alike from the agreed values."""
    if values.finite:
        return False
    ranks = values.bad_ranks or list(range(dist.get_world_size()))
    if skipped >= limit:
        from trainer.errors import NonFiniteError  # errors imports the checkpoint and data stacks

        raise NonFiniteError(
            f"non-finite loss or grad norm at step {step} on rank(s) {ranks} (loss {values.loss}, grad_norm "
            f"{values.grad_norm}); training.skip_nonfinite={limit} skips exhausted"
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
    """Scale gradients to `max_norm` at most; call only for a finite norm (the step's agreed values say)."""
    if max_norm > 0:
        coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
