"""parallelize_llama: FP8 -> TP -> CP -> lean norms -> activation checkpointing -> compile -> FSDP2, for every
family of models/families.py (Llama, Qwen2/3, Mistral, Ministral, OLMo 2, Granite, Phi-3, Qwen3-MoE): they
differ only in their TP plan (the model's own base_model_tp_plan) and in whether their norms may be swapped.

The order matters: the FP8 swap (training.fp8) comes first because it replaces the projection modules, and
TP's input/output hooks would be lost with the modules they were registered on. TP then shards the
projections (Float8Linear like any nn.Linear: each rank's shard runs its matmuls in FP8) into DTensors, so
the attention sees its local heads; CP only needs those local heads; checkpointing and compile wrap the
finished layers (compile after TP so DTensor ops are traced, before FSDP so FSDP's hooks stay outside the
compiled region); FSDP comes last and shards whatever the others built, over dp x cp.
"""

from __future__ import annotations

import logging

from torch.distributed.device_mesh import DeviceMesh

from models.causal_lm import CausalLMStage, tile_mlps
from models.families import FAMILIES, tp_layer_plan
from models.fp8 import convert_projections, fp8_layers
from models.norm import lean_norms
from models.registry import DTYPES, register_family
from parallel.ac import checkpointed_layers, keeps_attention
from parallel.cp.api import apply_cp, groups_for_strategy
from parallel.dims import ParallelDims, fp8_all_gather, holds_whole_weights, sub_mesh
from parallel.fsdp import apply_fsdp
from parallel.tp import apply_tp, sequence_shard_fns

log = logging.getLogger("longctx")


def parallelize_llama(stage: CausalLMStage, mesh: DeviceMesh, dims: ParallelDims, cfg) -> CausalLMStage:
    """Apply every parallelism of `cfg.parallel` to one pipeline stage (in place); returns it.
    With parallel.engine other than fsdp2 everything but the FSDP wrapping is applied."""
    pcfg = cfg.parallel
    family = FAMILIES[stage.config.model_type]
    layers = list(stage.model.layers.values())
    if getattr(cfg.training, "fp8", False):
        converted = convert_projections(
            fp8_layers(stage, cfg.training.fp8_bf16_layers),
            cfg.training.fp8_recipe,
            fp8_all_gather(cfg),
            fp8_cache_frozen(cfg, dims),
        )
        log.info("fp8: %d projections in FP8 (%s scaling)", len(converted), cfg.training.fp8_recipe)
    if dims.tp > 1:
        tp_mesh = sub_mesh(mesh, "tp")
        apply_tp(layers, tp_mesh, pcfg.sequence_parallel, layer_plan=tp_layer_plan(stage.config))
        if pcfg.sequence_parallel:
            stage.sequence_shards = sequence_shard_fns(tp_mesh)
    if dims.cp == 1:  # still attach the CP attention: document masks and kernel choice
        apply_cp(stage, None, None, layout="contiguous", kernel=cfg.model.attn_kernel)
    else:
        ring, uly = groups_for_strategy(
            pcfg.cp_strategy,
            cp_group=sub_mesh(mesh, "cp").get_group(),
            ring_group=sub_mesh(mesh, "ring").get_group(),
            ulysses_group=sub_mesh(mesh, "ulysses").get_group(),
        )
        apply_cp(stage, ring, uly, layout=pcfg.cp_layout, kernel=cfg.model.attn_kernel, accum=pcfg.cp_accum)
    if family.lean_norms and not (dims.tp > 1 and pcfg.sequence_parallel):  # SP: the norms run on DTensors
        lean_norms(stage)
    stage.ac_layers = checkpointed_layers(list(stage.model.layers.keys()), pcfg.activation_checkpointing)
    stage.keep_attention = keeps_attention(pcfg.activation_checkpointing)
    stage.ac_group = pcfg.ac_group
    stage.offload_activations = pcfg.activation_offload
    tile_mlps(stage, pcfg.mlp_chunks)
    if pcfg.compile:
        # Static shapes: a run trains one sequence length, and torch 2.11 raised an AssertionError when a second
        # length switched the layers to dynamic shapes (bench.train, 1B ring at 64k then 128k in one process).
        for layer in layers:
            layer.compile(dynamic=False)
        stage.compile_loss = True
    if pcfg.engine != "fsdp2":
        return stage  # another engine (DeepSpeed ZeRO) shards the stage itself
    fsdp_mesh = _hsdp_mesh(mesh) if dims.dp_replicate > 1 else sub_mesh(mesh, "dp_shard_cp")
    apply_fsdp(
        stage,
        layers,
        fsdp_mesh,
        param_dtype=DTYPES[cfg.model.dtype],
        cpu_offload=pcfg.fsdp_cpu_offload,
        reshard_after_forward=pcfg.reshard_after_forward,
    )
    return stage


def fp8_cache_frozen(cfg, dims: ParallelDims) -> bool:
    """Frozen FP8 weights are cast once (training.fp8_cache_frozen) when each rank holds them whole on the
    GPU (FSDP CPU offload keeps them on the host to save GPU memory, which a GPU cache would spend)."""
    whole = holds_whole_weights(dims.tp, dims.dp_shard * dims.cp, cfg.parallel.fsdp_cpu_offload)
    return bool(getattr(cfg.training, "fp8", False)) and cfg.training.fp8_cache_frozen and whole


def _hsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    # HSDP: replicate across dp_replicate, shard across dp_shard x cp.
    sub_mesh(mesh, "dp_shard_cp")
    return mesh["dp_replicate", "dp_shard_cp"]


for _family in FAMILIES:
    register_family(_family, parallelize_llama)
