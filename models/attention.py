"""Context-parallel attention plugged into Hugging Face models through `AttentionInterface`.

Selecting `attn_implementation="longctx"` makes every attention layer call `longctx_attention`, which
hands the (already rotary-embedded) q/k/v to the CP core. The per-batch `CPContext` arrives as the
`cp_context` keyword that the decoder layers forward to the attention function; without one (plain
single-device use) the layer attends causally over its local sequence.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from parallel.cp.api import CPContext, attend, build_context

ATTN_IMPLEMENTATION = "longctx"


# A compile boundary: the CP attention is communication and a Python loop over blocks (nothing for the
# compiler to fuse), and tracing into it would guard on the per-batch context and recompile every step.
@torch.compiler.disable
def longctx_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cp_context: CPContext | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """q [B, H, S, D], k/v [B, Hkv, S, D] -> ([B, S, H, D], None) as HF attention functions return."""
    if attention_mask is not None:
        raise ValueError(
            "longctx attention takes no padding mask: pack sequences (doc_ids) instead of padding them"
        )
    if dropout:
        raise ValueError("longctx attention does not implement attention dropout; set attention_dropout=0")
    if cp_context is None:
        cp_context = build_context(query.shape[2], layout="contiguous")
    # Features a family may pass that the CP kernels cannot apply (config checks reject them first).
    window = kwargs.get("sliding_window")
    if window is not None and window < cp_context.seq_len:
        raise ValueError(f"longctx attention has no sliding window ({window} < {cp_context.seq_len} tokens)")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"longctx attention does not implement {name} (logit soft-capping / attention sinks)"
            )
    out = attend(query, key, value, cp_context, scaling, key=getattr(module, "layer_idx", None))
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    # Causality and document boundaries are handled inside the CP kernels; an S x S mask at long
    # context would cost more memory than the model.
    return None


def register() -> str:
    """Register the attention function and its (empty) mask builder; returns the implementation name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, longctx_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
    return ATTN_IMPLEMENTATION
