"""What is trained: every weight (full fine-tuning) or LoRA adapters on a frozen base (lora.r > 0).

A training kind is the small interface the trainer calls at the points where the two differ - how the
meta-device build is changed, its FLOPs per token, what the run exports - so the loop itself has no LoRA
branches. The engine's optimizer, grad norm and clipping act on the parameters that require grad, and
checkpoints hold only those where some are frozen (trainer/checkpoint_state.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from models.registry import build_hf_model
from trainer.metrics import flops_per_token


class TrainingKind(Protocol):
    name: str

    def stage_options(self) -> dict[str, Any]:
        """Keyword arguments for `trainer.model_build.StageLoader` (its `dtype`, `wrap_hf`, `wrap_source`):
        how this kind changes the meta-device build of the stage; {} for the plain model."""
        ...

    def build_hf(self, model_cfg: Any, seed: int) -> nn.Module:
        """The whole single-device HF model as this kind trains it, materialised (benchmarks and references
        build with it; the trainer never does). Raises OSError / ValueError."""
        ...

    def flops_per_token(self, hf_config: Any, seq_len: int) -> float:
        """Model FLOPs per trained token, for MFU (trainer/metrics.py states the convention)."""
        ...

    def export(self, engine: Any, hf_config: Any, tokenizer: Any, out_dir: Path, ckpt_cfg: Any) -> None:
        """Collective: what the run leaves under output_dir at the end (`engine`: trainer/engine.py)."""
        ...


class FullTraining:
    """Every weight trains, in fp32 masters (FSDP casts to model.dtype for compute)."""

    name = "full"

    def stage_options(self) -> dict[str, Any]:
        return {}  # the engine's dtype (trainer/engine.py: stage_build), every weight from the source

    def build_hf(self, model_cfg: Any, seed: int) -> nn.Module:
        return build_hf_model(model_cfg.path, model_cfg.config, dtype=torch.float32, seed=seed)

    def flops_per_token(self, hf_config: Any, seq_len: int) -> float:
        return flops_per_token(hf_config, seq_len)

    def export(self, engine: Any, hf_config: Any, tokenizer: Any, out_dir: Path, ckpt_cfg: Any) -> None:
        if ckpt_cfg.export_hf:  # the engine gathers its own shards (FSDP2 DTensors or ZeRO partitions)
            engine.export_hf(hf_config, tokenizer, Path(out_dir) / "hf", ckpt_cfg.export_dtype)


def training_kind(cfg: Any, hf_config: Any) -> TrainingKind:
    """The kind `cfg` asks for; LoRA settings are checked against the model here (before any weights load)."""
    from trainer.lora_kind import LoraTraining, lora_active

    if lora_active(cfg.lora):
        return LoraTraining.from_config(cfg, hf_config)
    return FullTraining()
