"""Tensor parallelism with DTensor: column-wise q/k/v/gate/up, row-wise o/down, optional sequence parallel.

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


def _plan(sequence_parallel: bool) -> dict:
    if not sequence_parallel:
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        return {name: styles[kind]() for name, kind in LAYER_PLAN.items()}
    gather = dict(desired_input_layouts=(Replicate(),), use_local_output=True)
    plan = {name: ColwiseParallel() for name, kind in LAYER_PLAN.items() if kind == "colwise"}
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
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
    )
    return plan


def apply_tp(layers: list[nn.Module], tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    """Shard each decoder layer's projections (and, with sequence parallel, its norms) over `tp_mesh`."""
    plan = _plan(sequence_parallel)
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
