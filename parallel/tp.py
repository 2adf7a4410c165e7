"""Tensor parallelism with DTensor: column-wise q/k/v/gate/up, row-wise o/down.

Heads are split across the TP group; the HF attention derives its local head count from the projected
shape (`view(..., -1, head_dim)`), so the model code needs no change and CP then operates on the local
heads. Embedding, norms and LM head stay replicated over TP (their gradients come out identical on every
TP rank because the column-wise inputs all-reduce their gradient in backward).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

LAYER_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


def apply_tp(layers: list[nn.Module], tp_mesh: DeviceMesh) -> None:
    """Shard each decoder layer's projections over `tp_mesh` (in place)."""
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {name: styles[kind]() for name, kind in LAYER_PLAN.items()}
    for layer in layers:
        parallelize_module(layer, tp_mesh, plan)
