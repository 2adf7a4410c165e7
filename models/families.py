"""The model families longctx trains, what each needs, and the model features the CP attention cannot honour.

A family qualifies when its decoder layers are pre-built HF modules whose attention goes through
`AttentionInterface` with plain causal attention (optionally GQA, a per-head or per-projection q/k norm, a
fused qkv, scaled residuals): CP then only swaps the attention function. Tensor parallelism follows the
model's own `base_model_tp_plan` (transformers), translated to DTensor styles in parallel/tp.py, so a new
family needs no TP code. `check_family` is the one function that rejects a model at config time; the
message names the config field responsible.

Pure data and checks: no torch.distributed, no transformers import at module load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.expert_layout import QWEN3_MOE, FusedExperts
from parallel.dims import ConfigError


@dataclass(frozen=True)
class Family:
    model_type: str
    name: str
    lean_norms: bool = True
    """The layer norms compute `weight * normed.to(input_dtype)` (Llama's RMSNorm), which LeanRMSNorm
    reproduces bit for bit; OLMo 2 multiplies before the cast, so it keeps its own norms."""
    sequence_parallel: bool = True
    """Pre-norm layers (input_layernorm, post_attention_layernorm) with head-sharded projections: the
    sequence-parallel plan of parallel/tp.py applies."""
    tensor_parallel: bool = True
    """The model's base_model_tp_plan uses only styles parallel/tp.py implements."""
    pretrained: bool = True
    """Its checkpoints load through the sharded safetensors loader."""
    experts: tuple[FusedExperts, ...] = ()
    """Fused expert parameters and the per-expert checkpoint tensors they are assembled from
    (models/expert_layout.py)."""


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "Llama 2/3/3.1"),
        Family("qwen2", "Qwen2 / Qwen2.5"),
        Family("mistral", "Mistral / Mistral-Nemo"),
        Family("qwen3", "Qwen3"),
        Family("olmo2", "OLMo 2", lean_norms=False, sequence_parallel=False),
        Family("granite", "Granite 3"),
        Family("phi3", "Phi-3 / Phi-3.5", sequence_parallel=False),
        Family("ministral", "Ministral"),
        Family("qwen3_moe", "Qwen3-MoE", sequence_parallel=False, tensor_parallel=False, experts=QWEN3_MOE),
    )
}

# Why some popular model types are not in the table (when no field-level check below already says so).
NOT_SUPPORTED = {
    "gemma2": "Gemma 2 soft-caps attention logits and alternates sliding-window layers",
    "gemma3": "Gemma 3 alternates sliding-window layers",
    "gemma3_text": "Gemma 3 alternates sliding-window layers",
    "gpt_oss": "gpt-oss attends through learned attention sinks and sliding-window layers",
    "cohere2": "Command R7B alternates sliding-window layers",
}

# HF TP styles parallel/tp.py translates (see tp.HF_STYLES); others (MoE packing, expert plans) are refused.
TP_STYLES = (
    "colwise",
    "rowwise",
    "colwise_gather_output",
    "rowwise_split_input",
    "replicated_with_grad_allreduce",
)


def expert_layout(hf_config: Any) -> tuple[FusedExperts, ...]:
    """The fused expert parameters of the model's family (none for dense families and unknown types)."""
    family = FAMILIES.get(getattr(hf_config, "model_type", None))
    return family.experts if family is not None else ()


def family_names() -> str:
    """The supported families as a README/doc line, e.g. 'Llama 2/3/3.1, Qwen2 / Qwen2.5, ...'."""
    return ", ".join(f.name for f in FAMILIES.values())


def tp_layer_plan(hf_config: Any) -> dict[str, str]:
    """The model's own per-layer TP plan (`base_model_tp_plan` minus the `layers.*.` prefix)."""
    plan = getattr(hf_config, "base_model_tp_plan", None) or {}
    prefix = "layers.*."
    return {k[len(prefix) :]: v for k, v in plan.items() if k.startswith(prefix)}


def stage_scales(hf_config: Any) -> tuple[float, float]:
    """(embedding multiplier, logits divisor) that the HF model applies outside its modules (Granite)."""
    return (
        float(getattr(hf_config, "embedding_multiplier", 1.0) or 1.0),
        float(getattr(hf_config, "logits_scaling", 1.0) or 1.0),
    )


def rope_needs_length(hf_config: Any) -> bool:
    """Whether the rotary embedding reads the sequence length off the positions it is given (dynamic NTK
    rescales from it, LongRoPE picks its short or long factors by it)."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    kind = str(rope.get("rope_type", "default")) if isinstance(rope, dict) else "default"
    return "dynamic" in kind or kind == "longrope"


def context_notes(hf_config: Any, seq_len: int) -> list[str]:
    """Lines worth printing before a run: the RoPE in use (pretrained or overridden) and its window.
    (ParallelDims.validate_model already notes a seq_len past max_position_embeddings.)"""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    window = getattr(hf_config, "max_position_embeddings", None)
    return [f"rope: {', '.join(f'{k}={v}' for k, v in rope.items())}; max_position_embeddings={window}"]


def check_family(
    hf_config: Any, seq_len: int, *, tp: int = 1, sequence_parallel: bool = False, pretrained: bool = False
) -> Family:
    """The model's Family, or ConfigError naming the field (or parallel key) that longctx cannot honour."""
    mt = getattr(hf_config, "model_type", None)
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(hf_config, field, None) is not None:
            raise ConfigError(
                f"model.config.{field}",
                f"{mt} soft-caps logits ({getattr(hf_config, field)}), which longctx's CP attention and "
                "chunked loss do not apply; this model is not supported",
            )
    # Sliding windows and attention dropout: parallel/layout_checks.check_features (the planner runs it too).
    if (
        getattr(hf_config, "use_bidirectional_attention", False)
        or getattr(hf_config, "is_causal", True) is False
    ):
        raise ConfigError("model.config.use_bidirectional_attention", "longctx attention is causal only")
    if getattr(hf_config, "attention_dropout", 0.0):
        raise ConfigError("model.config.attention_dropout", "longctx attention has no dropout; set it to 0")
    if getattr(hf_config, "output_router_logits", False):
        raise ConfigError(
            "model.config.output_router_logits",
            "the MoE load-balancing loss is not computed by longctx; set output_router_logits: false",
        )
    if mt not in FAMILIES:
        why = f" ({NOT_SUPPORTED[mt]})" if mt in NOT_SUPPORTED else ""
        raise ConfigError(
            "model.config.model_type", f"{mt!r} is not supported{why}; supported: {' | '.join(FAMILIES)}"
        )
    family = FAMILIES[mt]
    if tp > 1:
        bad = sorted({s for s in tp_layer_plan(hf_config).values() if s not in TP_STYLES})
        if not family.tensor_parallel or bad:
            what = f" (its plan uses {', '.join(bad)})" if bad else ""
            raise ConfigError(
                "parallel.tp", f"tensor parallelism is not implemented for {family.name}{what}; use tp=1"
            )
        if sequence_parallel and not family.sequence_parallel:
            raise ConfigError(
                "parallel.sequence_parallel",
                f"not implemented for {family.name} (its layers are not pre-norm with head-sharded "
                "projections); set it to false",
            )
    if pretrained and not family.pretrained:
        raise ConfigError(
            "model.path",
            f"{family.name} checkpoints do not load yet; train it from model.config (random init)",
        )
    return family
