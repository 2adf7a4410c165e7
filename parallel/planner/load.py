"""Predicted memory while the model loads (trainer/model_build.py), per GPU and per node of host RAM.

The stage is built on the meta device and each rank allocates only its fp32 shards (4 bytes per parameter
of its stage / F, on the host instead of the GPU with FSDP CPU offload; with LoRA the frozen base in
model.dtype plus fp32 adapters), then fills them:

    GPU   4 * shard  (0 with fsdp_cpu_offload)  + with random init the largest module's full fp32 tensors
          (the family's init runs on the device, one module at a time: the embedding, V*h), from a
          checkpoint one read block (the saved bytes are copied to the GPU and cast there)
    host  runtime (the calibration's overhead)  + the read buffers (models/safetensors_reader.BUFFERS
          blocks of models/safetensors_io.BLOCK_BYTES) + 4 * shard with fsdp_cpu_offload; times the GPUs
          of a node

For comparison, `whole` is what loading the whole fp32 model on every rank first costs (what
`from_pretrained` per rank did): 4 * P on every GPU and on the host for each rank of a node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from parallel.planner.enumerate import Layout
from parallel.planner.lora import adapter_layer_params
from parallel.planner.memory import GIB, ModelShape, Workload

# models/safetensors_io.BLOCK_BYTES and safetensors_reader.BUFFERS (parallel/ keeps its own copy of the figures)
READ_BLOCK_BYTES = 64 * 2**20
READ_BUFFERS = 6


@dataclass(frozen=True)
class LoadMemory:
    gpu: int
    """Peak bytes on one GPU while loading."""
    host_per_node: int
    """Peak host bytes of one node's ranks while loading."""
    whole: int
    """Bytes the whole fp32 model needs on each rank (the old per-rank full load)."""

    @property
    def gpu_gib(self) -> float:
        return self.gpu / GIB

    @property
    def host_gib(self) -> float:
        return self.host_per_node / GIB


def load_memory(
    shape: ModelShape,
    layout: Layout,
    work: Workload,
    gpus_per_node: int,
    runtime_bytes: int,
    random_init: bool,
) -> LoadMemory:
    stage_layers = math.ceil(shape.layers / layout.pp)
    base_bytes = work.compute_bytes if work.lora_rank else 4  # LoRA: the frozen base is built in model.dtype
    fsdp = layout.dp * layout.cp
    shard = base_bytes * math.ceil(
        (stage_layers * shape.layer_params(layout.tp) + shape.root_params(layout.pp)) / fsdp
    )
    if work.lora_rank:  # plus the fp32 adapter shards
        p_adapter = adapter_layer_params(shape, work.lora_rank, work.lora_targets, layout.tp)
        shard += 4 * math.ceil(stage_layers * p_adapter / fsdp)
    largest_module = 4 * shape.vocab * shape.hidden if random_init else 0
    staging = 0 if random_init or work.fsdp_cpu_offload else READ_BLOCK_BYTES
    gpu = (0 if work.fsdp_cpu_offload else shard) + largest_module + staging
    per_rank_host = runtime_bytes + READ_BUFFERS * READ_BLOCK_BYTES + (shard if work.fsdp_cpu_offload else 0)
    ranks = min(gpus_per_node, layout.dp * layout.tp * layout.pp * layout.cp)
    total = shape.layers * shape.layer_params() + shape.root_params()
    return LoadMemory(gpu=gpu, host_per_node=ranks * per_rank_host, whole=4 * total)
