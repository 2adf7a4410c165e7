"""Tensor parallelism with DTensor: column-wise q/k/v/gate/up, row-wise o/down, optional sequence parallel.

The per-layer plan is the model's own `base_model_tp_plan` from transformers (models/families.py strips its
`layers.*.` prefix); HF_STYLES turns each of its style names into the DTensor style with the same math, so
FSDP2 then shards the resulting DTensors over dp x cp as for a hand-written plan. `LAYER_PLAN` (Llama's)
is the default.

Heads are split across the TP group; the HF attention derives its local head count from the projected
shape (`view(..., -1, head_dim)`), so the model code needs no change and CP then operates on the local
heads. Embedding, final norm and LM head stay replicated over TP (their gradients come out identical on
every TP rank because the column-wise inputs all-reduce their gradient in backward).

Sequence parallel (`parallel.sequence_parallel`): between the attention and MLP blocks the residual stream
and the two RMSNorms work on 1/tp of the (local CP) sequence. Each block gathers the sequence on entry
(so the HF modules see whole [B, S, D] tensors and their shape logic holds) and reduce-scatters it on exit
(row-wise output Shard(1)) - the same traffic as TP's all-reduce, with the norm/residual activations /tp.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

LAYER_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


HF_STYLES: dict[str, Callable] = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    # The module after it needs every output feature (OLMo 2's q/k norm over all heads, Phi-3's split of a
    # fused qkv or gate_up): gather the output; the row-wise layer then takes its slice of a replicated input.
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
    # A per-head q/k norm (Qwen3) sees [B, S, heads/tp, D]: its weight stays replicated and its gradient,
    # partial per TP rank, is summed by DTensor - the heads dimension plays the role of a sharded sequence.
    "replicated_with_grad_allreduce": lambda: SequenceParallel(sequence_dim=2, use_local_output=True),
}


def _plan(sequence_parallel: bool, layer_plan: dict[str, str]) -> dict:
    unknown = sorted({kind for kind in layer_plan.values() if kind not in HF_STYLES})
    if unknown:
        raise ValueError(f"tensor-parallel styles {', '.join(unknown)} are not implemented")
    plan = {name: HF_STYLES[kind]() for name, kind in layer_plan.items()}
    if not sequence_parallel:
        return plan
    gather = dict(desired_input_layouts=(Replicate(),), use_local_output=True)
    plan.update(
        {
            "input_layernorm": SequenceParallel(),
            "post_attention_layernorm": SequenceParallel(),
            # HF passes the attention input as a keyword, the MLP input positionally.
            "self_attn": PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)},
                desired_input_kwarg_layouts={"hidden_states": Replicate()},
                use_local_output=True,
            ),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), **gather),
        }
    )
    # The row-wise projections end the blocks: reduce-scatter their output back to sequence shards.
    plan.update(
        {name: RowwiseParallel(output_layouts=Shard(1)) for name, k in layer_plan.items() if k == "rowwise"}
    )
    return plan


def apply_tp(
    layers: list[nn.Module],
    tp_mesh: DeviceMesh,
    sequence_parallel: bool = False,
    layer_plan: dict[str, str] | None = None,
) -> None:
    """Shard each decoder layer's projections (and, with sequence parallel, its norms) over `tp_mesh`.
    `layer_plan`: module suffix -> HF style name (a model's base_model_tp_plan); default LAYER_PLAN."""
    plan = _plan(sequence_parallel, LAYER_PLAN if layer_plan is None else layer_plan)
    for layer in layers:
        parallelize_module(layer, tp_mesh, plan)


def sequence_shard_fns(tp_mesh: DeviceMesh) -> tuple[Callable, Callable]:
    """(to_shard, to_full) for the residual stream at the stage's ends: the embedding output is cut to this
    rank's 1/tp of the sequence, and the last layer's output gathered back for the final norm and loss.
    Going through DTensor gives the right gradients: the replicated loss sends back identical gradients,
    so the backward of the gather is a slice (not a sum), and the backward of the cut is a gather."""

    def to_shard(h: torch.Tensor) -> torch.Tensor:
        return (
            DTensor.from_local(h, tp_mesh, [Replicate()], run_check=False)
            .redistribute(tp_mesh, [Shard(1)])
            .to_local()
        )

    def to_full(h: torch.Tensor) -> torch.Tensor:
        return (
            DTensor.from_local(h, tp_mesh, [Shard(1)], run_check=False)
            .redistribute(tp_mesh, [Replicate()])
            .to_local()
        )

    return to_shard, to_full
