"""RMSNorm that keeps only its bf16 input and an fp32 scale per token for backward.

Hugging Face's Llama/Qwen2/Mistral RMSNorm upcasts the whole [T, h] input to fp32 and autograd keeps that
copy (and its normalised product) for backward: 3x the bf16 input per norm, two norms per layer - at 512k
tokens per GPU and h = 4096, 24 GiB per layer that the recompute of a checkpointed layer must hold. This
one computes the same function (fp32 math, cast to the input dtype, times the weight) in row chunks, saves
the input (which the layer keeps anyway) and 1/rms per row, and recomputes the normalised rows in backward.
"""

from __future__ import annotations

import torch
from torch import nn

ROWS_PER_CHUNK = 16384  # fp32 temporaries of at most ROWS_PER_CHUNK x h


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device)
        for i in range(0, rows.shape[0], ROWS_PER_CHUNK):
            r = rows[i : i + ROWS_PER_CHUNK].float()
            rstd[i : i + ROWS_PER_CHUNK] = torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
            out[i : i + ROWS_PER_CHUNK] = weight * (r * rstd[i : i + ROWS_PER_CHUNK]).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out.view(*x.shape[:-1], x.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        rows, dy_rows = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = torch.empty_like(rows)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for i in range(0, rows.shape[0], ROWS_PER_CHUNK):
            s = slice(i, i + ROWS_PER_CHUNK)
            n = rows[s].float() * rstd[s]
            # The forward's casts, in reverse: grad of (weight * n.to(x.dtype)) w.r.t. n, back in fp32.
            gn = (dy_rows[s] * weight).to(x.dtype).float()
            dx[s] = (rstd[s] * (gn - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype)
            dw += (dy_rows[s] * n.to(x.dtype)).float().sum(0)
        return dx.view_as(x), dw.to(weight.dtype), None


class LeanRMSNorm(nn.Module):
    """Drop-in for an HF `*RMSNorm` (adopts its `weight` under the same name, so checkpoints and the HF
    export are unchanged)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


def _is_hf_rmsnorm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def lean_norms(stage: nn.Module) -> None:
    """Replace the stage's HF RMSNorms (per layer and the final one) by `LeanRMSNorm`, before FSDP/TP."""
    for layer in stage.model.layers.values():
        for name in ("input_layernorm", "post_attention_layernorm"):
            if _is_hf_rmsnorm(getattr(layer, name, None)):
                setattr(layer, name, LeanRMSNorm(getattr(layer, name)))
    if stage.model.norm is not None and _is_hf_rmsnorm(stage.model.norm):
        stage.model.norm = LeanRMSNorm(stage.model.norm)
