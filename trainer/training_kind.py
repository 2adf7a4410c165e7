"""What is trained: every weight (full fine-tuning) or LoRA adapters on a frozen base (lora.r > 0).

A training kind is the small interface the trainer calls at the points where the two differ - how the HF
model is built, whether checkpoints hold the frozen weights, what the run exports - so the loop itself has
no LoRA branches. The optimizer, grad norm and clipping already act on the parameters that require grad.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch
from torch import nn

from models.registry import build_hf_model
from trainer.hf_export import export_hf
from trainer.metrics import flops_per_token


class TrainingKind(Protocol):
    name: str
    checkpoint_frozen: bool
    """Whether checkpoints hold parameters that do not train (False: they are rebuilt from model.path)."""

    def build_hf(self, model_cfg: Any, seed: int) -> nn.Module:
        """The single-device HF model, ready for `CausalLMStage` (raises OSError / ValueError)."""
        ...

    def flops_per_token(self, hf_config: Any, seq_len: int) -> float:
        """Model FLOPs per trained token, for MFU (trainer/metrics.py states the convention)."""
        ...

    def export(
        self,
        parts: list[nn.Module],
        hf_config: Any,
        tokenizer: Any,
        out_dir: str | os.PathLike,
        ckpt_cfg: Any,
    ) -> None:
        """Collective: what the run leaves under output_dir at the end."""
        ...


class FullTraining:
    """Every weight trains, in fp32 masters (FSDP casts to model.dtype for compute)."""

    name = "full"
    checkpoint_frozen = True

    def build_hf(self, model_cfg: Any, seed: int) -> nn.Module:
        return build_hf_model(model_cfg.path, model_cfg.config, dtype=torch.float32, seed=seed)

    def flops_per_token(self, hf_config: Any, seq_len: int) -> float:
        return flops_per_token(hf_config, seq_len)

    def export(
        self,
        parts: list[nn.Module],
        hf_config: Any,
        tokenizer: Any,
        out_dir: str | os.PathLike,
        ckpt_cfg: Any,
    ) -> None:
        if ckpt_cfg.export_hf:
            export_hf(parts, hf_config, tokenizer, os.path.join(out_dir, "hf"), ckpt_cfg.export_dtype)


def training_kind(cfg: Any, hf_config: Any) -> TrainingKind:
    """The kind `cfg` asks for; LoRA settings are checked against the model here (before any weights load)."""
    from trainer.lora_kind import LoraTraining, lora_active

    if lora_active(cfg.lora):
        return LoraTraining.from_config(cfg, hf_config)
    return FullTraining()
