"""Chunked LM head + cross-entropy: full-vocabulary logits never exist for the whole sequence.

Each chunk of hidden states is projected, upcast to fp32 and reduced to a summed loss inside
`torch.utils.checkpoint`, so the backward recomputes that chunk's logits instead of keeping them:
peak extra memory is one chunk x vocab in fp32, whatever the sequence length.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_math(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor):
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits lose the loss
    return F.cross_entropy(
        logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@functools.cache
def _compiled_chunk_math():
    # One fused pass over a chunk's logits (cast, log-softmax, pick) instead of several fp32 round trips.
    return torch.compile(_chunk_math, dynamic=False)  # a chunk has one of two lengths (full or the tail)


def _chunk_loss(hidden, weight, bias, labels, compiled: bool = False):
    return (_compiled_chunk_math() if compiled else _chunk_math)(hidden, weight, bias, labels)


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor,
    chunk_tokens: int = 4096,
    compiled: bool = False,
) -> torch.Tensor:
    """Sum of token cross-entropies over labels != -100. hidden [B, S, D], labels [B, S] (already shifted).
    `compiled` runs each chunk through torch.compile (parallel.compile)."""
    b, s, _ = hidden.shape
    step = max(1, chunk_tokens // max(b, 1))
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, s, step):
        h, y = hidden[:, i : i + step], labels[:, i : i + step]
        if s <= step:
            total = total + _chunk_loss(h, lm_head.weight, lm_head.bias, y, compiled)
        else:
            total = total + checkpoint(
                _chunk_loss, h, lm_head.weight, lm_head.bias, y, compiled, use_reentrant=False
            )
    return total


def chunked_token_scores(
    hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor, chunk_tokens: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (fp32, 0 where the label is -100) and the arg-max token id, each [B, S], for
    evaluation: chunked like the training loss, so full-vocabulary logits exist for one chunk at a time."""
    b, s, _ = hidden.shape
    step = max(1, chunk_tokens // max(b, 1))
    losses, preds = [], []
    for i in range(0, s, step):
        logits = F.linear(hidden[:, i : i + step], lm_head.weight, lm_head.bias)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        y = labels[:, i : i + step]
        # Class dimension last, as in training: a transposed [B, V, S] view sends log-softmax down a strided path.
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        losses.append(ce.view_as(y))
        preds.append(logits.argmax(-1))
    return torch.cat(losses, 1), torch.cat(preds, 1)
