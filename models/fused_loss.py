"""Fused LM head + cross-entropy (`training.loss_impl`): the gradients are computed in the forward pass.

The chunked loss (models/loss.py) checkpoints each chunk, so its backward projects the chunk's logits a
second time: four LM-head matmuls of tokens x hidden x vocab per step (forward, recompute, grad input, grad
weight). Here each chunk's logits are made once, reduced to the loss and turned straight into
d loss / d logits = softmax - one_hot, which gives the chunk's grad input and adds into the grad weight:
three matmuls, one softmax pass instead of two. Backward only scales the stored gradients by the incoming
one. Memory: the grad input ([tokens, hidden], the hidden states' dtype) and the grad weight ([vocab,
hidden], the weight's dtype, accumulated chunk by chunk as autograd accumulates the chunked loss' per-chunk
grads) live from the forward to the backward; one chunk of fp32 logits at a time, as before.

`liger` hands the same job to liger-kernel's Triton kernel when it is installed (CUDA only).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
IMPLS = ("chunked", "fused", "liger")


def _loss_and_grad(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
):
    """One chunk: (summed fp32 loss, d loss / d logits in the weight's dtype). hidden [n, D], labels [n]."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits lose the loss
    valid = labels != IGNORE_INDEX
    target = labels.clamp(min=0)[:, None]
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    loss = ((lse - logits.gather(-1, target)).squeeze(-1) * valid).sum()
    grad = (logits - lse).exp().scatter_add(-1, target, torch.full_like(lse, -1.0))
    return loss, (grad * valid[:, None]).to(weight.dtype)


@functools.cache
def _compiled_loss_and_grad():
    # One pass over a chunk's logits (cast, log-sum-exp, softmax - one_hot, cast back) instead of several.
    return torch.compile(_loss_and_grad, dynamic=False)  # a chunk has one of two lengths (full or the tail)


def _scale_(t: torch.Tensor, scale: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """t *= scale in float32 (a bf16-rounded scale would bias every gradient by up to 0.4%), a slab of
    rows at a time so no full fp32 copy exists."""
    flat = t.view(-1, t.shape[-1])
    for i in range(0, flat.shape[0], rows):
        part = flat[i : i + rows]
        part.copy_(part.to(torch.promote_types(part.dtype, torch.float32)) * scale)
    return t


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens: int, compiled: bool):
        fn = _compiled_loss_and_grad() if compiled else _loss_and_grad
        h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        acc = torch.promote_types(h.dtype, torch.float32)
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        total = h.new_zeros((), dtype=acc)
        for i in range(0, h.shape[0], chunk_tokens):
            hc = h[i : i + chunk_tokens]
            loss, g = fn(hc, weight, bias, y[i : i + chunk_tokens])
            total = total + loss
            if need_h:
                torch.mm(g, weight, out=grad_h[i : i + chunk_tokens])
            if need_w:
                grad_w.addmm_(g.t(), hc)
            if need_b:
                grad_b += g.to(acc).sum(0)
        ctx.save_for_backward(
            grad_h.view_as(hidden) if need_h else None, grad_w, grad_b.to(bias.dtype) if need_b else None
        )
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        grads = [None if g is None else _scale_(g, grad_out) for g in (grad_h, grad_w)]
        gb = None if grad_b is None else _scale_(grad_b[None], grad_out)[0]
        return grads[0], grads[1], gb, None, None, None


def fused_cross_entropy_sum(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor,
    chunk_tokens: int = 4096,
    compiled: bool = False,
) -> torch.Tensor:
    """Sum of token cross-entropies over labels != -100, gradients computed in the forward pass.
    hidden [B, S, D], labels [B, S] (already shifted). Without autograd (evaluation) only the loss."""
    if not torch.is_grad_enabled():
        from models.loss import chunked_cross_entropy_sum

        return chunked_cross_entropy_sum(hidden, lm_head, labels, chunk_tokens, compiled)
    return FusedLinearCrossEntropy.apply(
        hidden, lm_head.weight, lm_head.bias, labels, max(1, chunk_tokens), compiled
    )


def liger_missing() -> str | None:
    """Why liger-kernel's fused linear cross-entropy cannot be imported here, or None when it can."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import (  # noqa: F401
            LigerFusedLinearCrossEntropyFunction,
        )
    except ImportError as exc:
        return (
            f"needs liger-kernel on a CUDA machine (pip install liger-kernel): {' '.join(str(exc).split())}"
        )
    return None


def liger_cross_entropy_sum(
    hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor
) -> torch.Tensor:
    """The same sum through liger-kernel (it picks its own chunk size from the vocabulary)."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    out = LigerFusedLinearCrossEntropyFunction.apply(
        h, lm_head.weight, y, lm_head.bias, None, IGNORE_INDEX, 0.0, 0.0, "sum"
    )
    return out[0].float()
