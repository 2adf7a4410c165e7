"""AdamW and the learning-rate schedule (linear warm-up, then constant / linear / cosine decay)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(params, ocfg, allow_fused: bool = True) -> torch.optim.Optimizer:
    """AdamW; on GPUs its fused kernel. The default (foreach) step allocates temporaries as large as all
    trained parameters together: 30 GiB of fp32 for an 8B model, which is what made full fine-tuning of the
    8B shape run out of memory inside optimizer.step on one H200. `allow_fused=False` for optimizers whose
    parameters an engine moves after construction (DeepSpeed's flat partitions)."""
    params = [p for p in params if p.requires_grad]
    fused = allow_fused and bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(
        params,
        lr=ocfg.lr,
        betas=(ocfg.beta1, ocfg.beta2),
        eps=ocfg.eps,
        weight_decay=ocfg.weight_decay,
        fused=True if fused else None,
    )


def lr_factor(step: int, ocfg, total_steps: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps."""
    if ocfg.warmup_steps and step < ocfg.warmup_steps:
        return (step + 1) / ocfg.warmup_steps
    if ocfg.scheduler == "constant":
        return 1.0
    decay = max(total_steps - ocfg.warmup_steps, 1)
    progress = min(max(step - ocfg.warmup_steps, 0) / decay, 1.0)
    floor = ocfg.min_lr_ratio
    if ocfg.scheduler == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, ocfg, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, ocfg, total_steps))
