"""FSDP2 (`fully_shard`) over dp x cp: CP ranks hold the same weights, so they shard them like DP ranks."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard


def apply_fsdp(
    root: nn.Module,
    layers: list[nn.Module],
    mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> None:
    """Shard each decoder layer as its own unit (all-gathered just in time), then the root with the rest.

    `mesh` is 1-D (dp_shard x cp flattened) or 2-D (dp_replicate, dp_shard x cp) for HSDP. Gradients are
    averaged over the mesh by FSDP; the trainer scales the loss by the mesh size so the result is the sum
    of per-rank gradients of (token loss sum / global valid tokens) - the exact global-batch mean.
    """
    kwargs = dict(
        mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    )
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root (embedding, norm, LM head) is needed again right at the start of backward: keep it gathered.
    fully_shard(root, reshard_after_forward=False, **kwargs)


def fp8_scale_hook(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """With FP8 all-gather (training.fp8, tensorwise): after every optimizer step, compute the FP8 scales
    of all sharded weights at once - one foreach amax and one all-reduce - instead of one all-reduce per
    weight inside each layer's all-gather (torchao's `precompute_float8_dynamic_scale_for_fsdp`). When no
    FP8 weight trains (a LoRA base) their scales never change: computed after the first step, then the
    hook removes itself (the first step's all-gathers compute them, as always before any hook ran)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp
    from torchao.float8.float8_linear import Float8Linear

    trains = any(m.weight.requires_grad for m in model.modules() if isinstance(m, Float8Linear))

    def hook(*_) -> None:
        precompute_float8_dynamic_scale_for_fsdp(model)
        if not trains:
            handle.remove()

    handle = optimizer.register_step_post_hook(hook)
