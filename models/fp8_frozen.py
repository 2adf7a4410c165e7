"""FP8 casts of a frozen weight made once (`training.fp8_cache_frozen`): a LoRA base that nothing shards.

torchao's Float8Linear casts its weight to FP8 in every matmul that uses it: three times a step under
activation checkpointing (the forward, its recompute, the input gradient's matmul - the last with its own
scaling under rowwise). A frozen weight gives the same FP8 values every time, so `FrozenFloat8Linear`
keeps the two casts - scaled for the output's matmul and for the input gradient's, made by torchao's own
`hp_tensor_to_float8_dynamic` - as buffers (`cache_weight`), and its matmul reads them. The input and the
output gradient are cast every step by torchao exactly as Float8Linear casts them, and no weight gradient
is formed: the results are Float8Linear's, bit for bit (tests/test_fp8.py on CPU; compiled on a GPU the
uncached path casts inside Triton, which may round a tensorwise scale differently: tests/test_gpu_fp8.py).

Only for weights held whole by their rank (no TP, no FSDP sharding over dp x cp): the cache is the full
weight, 2 bytes per parameter for its two FP8 copies.

Single-device code; imports torchao (the `.[fp8]` extra), so models/fp8.py imports this module lazily.
"""

from __future__ import annotations

import torch
from torchao.float8.config import ScalingType
from torchao.float8.float8_linear import Float8Linear
from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic
from torchao.float8.float8_training_tensor import GemmInputRole


def _cast(hp: torch.Tensor, cast_config, mm_config, role, axis: int, config) -> torch.Tensor:
    """torchao's dynamic cast of `hp` as Float8Linear makes it for this operand."""
    return hp_tensor_to_float8_dynamic(
        hp,
        cast_config.target_dtype,
        mm_config,
        gemm_input_role=role,
        scaling_granularity=cast_config.scaling_granularity,
        axiswise_dim=get_maybe_axiswise_dim(axis, cast_config.scaling_granularity),
        round_scales_to_power_of_2=config.round_scales_to_power_of_2,
    )


class _CachedWeightMatmul(torch.autograd.Function):
    """input @ weight.T with the weight already in FP8: `w_fwd_t` for the output, `w_bwd_t` for the input
    gradient (torchao's two scalings of weight.T); no weight gradient (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x, w_fwd_t, w_bwd_t, mm_config, config):
        ctx.save_for_backward(w_bwd_t)
        ctx.mm_config, ctx.config = mm_config, config
        x8 = _cast(x, config.cast_config_input, mm_config, GemmInputRole.INPUT, -1, config)
        out = torch.mm(x8.reshape(-1, x8.shape[-1]), w_fwd_t)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        (w_bwd_t,) = ctx.saved_tensors
        c = ctx.config
        g = grad.reshape(-1, grad.shape[-1])
        g8 = _cast(g, c.cast_config_grad_output, ctx.mm_config, GemmInputRole.GRAD_OUTPUT, -1, c)
        grad_input = torch.mm(g8, w_bwd_t.t())
        return grad_input.reshape(*grad.shape[:-1], grad_input.shape[-1]), None, None, None, None


def cacheable(config) -> bool:
    """The casts this module makes itself are dynamic (torchao's tensorwise and rowwise recipes)."""
    casts = (
        config.cast_config_input,
        config.cast_config_weight,
        config.cast_config_grad_output,
        config.cast_config_weight_for_grad_input,
    )
    return all(c.scaling_type is ScalingType.DYNAMIC for c in casts)


class FrozenFloat8Linear(Float8Linear):
    """A Float8Linear of a frozen weight; until `cache_weight` runs it computes exactly as Float8Linear."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Not persistent: derived from the weight, never checkpointed or exported.
        self.register_buffer("fp8_weight_t", None, persistent=False)
        self.register_buffer("fp8_weight_t_for_grad_input", None, persistent=False)

    @torch.no_grad()
    def cache_weight(self, dtype: torch.dtype, device: torch.device) -> None:
        """Cast the weight - as the forward sees it: whole, in the compute dtype `dtype`, on `device` -
        once for each of its matmuls. The input gradient's copy is stored transposed-contiguous, the layout
        its matmul wants (torchao would copy it into that layout at every call)."""
        w = self.weight
        # A DTensor on a mesh of one rank is whole (duck-typed: models/ does not import torch.distributed).
        w = w.to_local() if hasattr(w, "to_local") else w
        w_t = w.detach().to(device=device, dtype=dtype).t()
        c, mm = self.config, self.linear_mm_config
        self.fp8_weight_t = _cast(w_t, c.cast_config_weight, mm, GemmInputRole.WEIGHT, 0, c)
        self.fp8_weight_t_for_grad_input = _cast(
            w_t.contiguous(), c.cast_config_weight_for_grad_input, mm, GemmInputRole.WEIGHT, -1, c
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.fp8_weight_t is None:
            return super().forward(input)
        if torch.is_autocast_enabled():  # as Float8Linear: the output in the autocast dtype
            input = input.to(torch.get_autocast_gpu_dtype())
        out = _CachedWeightMatmul.apply(
            input, self.fp8_weight_t, self.fp8_weight_t_for_grad_input, self.linear_mm_config, self.config
        )
        return out if self.bias is None else out + self.bias.to(out.dtype)
