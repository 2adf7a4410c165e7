"""Model families: how to build a Llama-family HF model and which `parallelize_*` applies to it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from models.attention import register as register_attention


@dataclass(frozen=True)
class ModelFamily:
    name: str
    parallelize: Callable  # parallelize_<family>(stage, mesh, dims, cfg)


FAMILIES: dict[str, ModelFamily] = {}


def register_family(model_type: str, parallelize: Callable) -> None:
    FAMILIES[model_type] = ModelFamily(model_type, parallelize)


def family_of(hf_config: PretrainedConfig) -> ModelFamily:
    import models.parallelize  # noqa: F401  (registers the Llama-family entries)

    mt = getattr(hf_config, "model_type", None)
    if mt not in FAMILIES:
        raise ValueError(
            f"model.config: model_type {mt!r} is not supported; choose from {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[mt]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def head_dim_of(hf_config: PretrainedConfig) -> int:
    """Per-head width: the config's `head_dim` where it sets one, else hidden_size / heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def load_hf_config(path: str | None, inline: dict | None) -> PretrainedConfig:
    """The HF config from a hub id / local dir, or from inline fields (`model_type` selects the class)."""
    if inline is not None:
        fields = dict(inline)
        model_type = fields.pop("model_type")
        return AutoConfig.for_model(model_type, **fields)
    return AutoConfig.from_pretrained(path)


def build_hf_model(
    path: str | None, inline: dict | None, dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.nn.Module:
    """Load pretrained weights (`path`) or randomly initialise from a config, with longctx attention selected.

    Weights are kept in `dtype` (the trainer keeps fp32 masters and lets FSDP cast for compute)."""
    attn = register_attention()
    if inline is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    else:
        config = load_hf_config(None, inline)
        config._attn_implementation = attn
        torch.manual_seed(seed)  # identical random init on every rank
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model


def check_supported(hf_config: PretrainedConfig, seq_len: int) -> None:
    """Reject model features the CP attention would silently ignore."""
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True) and seq_len > window:
        raise ValueError(
            f"model.config.sliding_window: sliding-window attention ({window} tokens) is not supported by longctx "
            f"attention and training.seq_len={seq_len} exceeds it; set sliding_window: null"
        )
    if getattr(hf_config, "attention_dropout", 0.0):
        raise ValueError("model.config.attention_dropout: longctx attention has no dropout; set it to 0")
