"""One FSDP2 optimizer step: forward/backward of every micro-batch (or one pipeline pass), the global
loss, the grad norm, the non-finite check, clipping and the update. `Trainer` and bench/engines.py both
call it, so the benchmark times exactly what training runs (DeepSpeed's step is trainer/ds_engine.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from parallel.cp.sharding import shard_batch
from parallel.dims import sub_mesh, sub_rank_and_size
from trainer.loss import agree_step, clip_gradients, count_valid, global_grad_norm, loss_scale, skip_nonfinite


@dataclass
class StepResult:
    """One optimizer step: the global mean loss, the grad norm before clipping, whether it was skipped."""

    loss: float
    grad_norm: float
    skipped: bool


@dataclass
class StepGroups:
    """The process groups and ranks one step needs, from the run's mesh (FSDP2 and DeepSpeed alike: both
    shard over dp x cp, whose size scales the loss)."""

    dp_group: dist.ProcessGroup
    dp_cp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup | None
    fsdp_size: int
    cp_rank: int
    cp_size: int
    counts_loss: bool  # False on tensor-parallel replicas: their loss share is tp rank 0's

    @classmethod
    def from_mesh(cls, mesh: Any) -> StepGroups:
        dp_cp_group = sub_mesh(mesh, "dp_cp").get_group()
        cp_rank, cp_size = sub_rank_and_size(mesh, "cp")
        _, pp_size = sub_rank_and_size(mesh, "pp")
        tp_rank, _ = sub_rank_and_size(mesh, "tp")
        return cls(
            dp_group=sub_mesh(mesh, "dp").get_group(),
            dp_cp_group=dp_cp_group,
            pp_group=sub_mesh(mesh, "pp").get_group() if pp_size > 1 else None,
            fsdp_size=dist.get_world_size(dp_cp_group),
            cp_rank=cp_rank,
            cp_size=cp_size,
            counts_loss=tp_rank == 0,
        )


def fsdp2_step(
    model: Any,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    batches: list[dict[str, torch.Tensor]],
    groups: StepGroups,
    cfg: Any,
    device: torch.device,
    step: int,
    skipped_so_far: int,
    pipeline: Any = None,
) -> StepResult:
    """One step; `step` is the 0-based index of this step. The host waits for the device once, after
    backward: the loss, the non-finite flags and the grad norm come back together (`agree_step`).

    Raises NonFiniteError when the loss or grad norm is NaN/inf and training.skip_nonfinite is used up."""
    model.loss_scale = loss_scale(count_valid(batches, groups.dp_group, device), groups.fsdp_size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    layout = cfg.parallel.cp_layout
    shards = [shard_batch(b, groups.cp_size, groups.cp_rank, layout, device) for b in batches]
    if pipeline is not None:
        # All micro-batches of the step go through the pipeline schedule together.
        cat = {k: torch.cat([b[k] for b in shards]) for k in shards[0]}
        for loss in pipeline.step(cat["input_ids"], cat["position_ids"], cat["doc_ids"], cat["labels"]):
            loss_sum += loss.detach().double().sum()
    else:
        for b in shards:
            loss = model(b["input_ids"], b["position_ids"], b["doc_ids"], b["labels"])
            loss.backward()
            loss_sum += loss.detach().double().sum()
    grad_norm = global_grad_norm(params, groups.pp_group, device)
    values = agree_step(loss_sum, grad_norm, groups.fsdp_size, groups.counts_loss)
    skipped = skip_nonfinite(values, step + 1, skipped_so_far, cfg.training.skip_nonfinite)
    if not skipped:
        clip_gradients(params, cfg.training.max_grad_norm, grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(values.loss, values.grad_norm, skipped)
