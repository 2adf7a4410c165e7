"""Model families: how to build a Llama-family HF model and which `parallelize_*` applies to it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from models.attention import register as register_attention
from models.families import check_family, context_notes
from models.overrides import apply_overrides
from parallel.shape import head_dim_of  # noqa: F401  (re-exported for models/ and trainer/ callers)


@dataclass(frozen=True)
class ModelFamily:
    name: str
    parallelize: Callable  # parallelize_<family>(stage, mesh, dims, cfg)


FAMILIES: dict[str, ModelFamily] = {}


def register_family(model_type: str, parallelize: Callable) -> None:
    FAMILIES[model_type] = ModelFamily(model_type, parallelize)


def family_of(hf_config: PretrainedConfig) -> ModelFamily:
    import models.parallelize  # noqa: F401  (registers every family of models/families.py)

    mt = getattr(hf_config, "model_type", None)
    if mt not in FAMILIES:
        raise ValueError(
            f"model.config.model_type: {mt!r} is not supported; choose from {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[mt]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def load_hf_config(path: str | None, inline: dict | None) -> PretrainedConfig:
    """The HF config from a hub id / local dir, or from inline fields (`model_type` selects the class), or -
    with both - the pretrained config with the inline fields overridden (models/overrides.py)."""
    if path is None:
        fields = dict(inline)
        model_type = fields.pop("model_type")
        return AutoConfig.for_model(model_type, **fields)
    config = AutoConfig.from_pretrained(path)
    return apply_overrides(config, inline) if inline else config


def build_hf_model(
    path: str | None, inline: dict | None, dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.nn.Module:
    """Load pretrained weights (`path`) or randomly initialise from a config, with longctx attention selected.

    Weights are kept in `dtype` (the trainer keeps fp32 masters and lets FSDP cast for compute)."""
    attn = register_attention()
    if path is not None:
        overridden = {"config": load_hf_config(path, inline)} if inline else {}
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn, **overridden
        )
    else:
        config = load_hf_config(None, inline)
        config._attn_implementation = attn
        torch.manual_seed(seed)  # identical random init on every rank
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model


def check_supported(
    hf_config: PretrainedConfig,
    seq_len: int,
    *,
    tp: int = 1,
    sequence_parallel: bool = False,
    pretrained: bool = False,
) -> list[str]:
    """Reject models and model features the CP attention would silently ignore (ConfigError naming the
    field: soft-capping, sliding windows shorter than seq_len, non-causal layers, unsupported families and
    their TP limits; models/families.py). Returns notes to log (the RoPE in use, a seq_len past the window)."""
    check_family(hf_config, seq_len, tp=tp, sequence_parallel=sequence_parallel, pretrained=pretrained)
    return context_notes(hf_config, seq_len)
