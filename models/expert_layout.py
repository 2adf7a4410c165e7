"""How a family's fused expert parameters map onto the per-expert tensors of its hub checkpoints.

transformers 5 holds a MoE layer's experts as 3-D parameters, `<experts>.gate_up_proj` [E, 2I, H] and
`<experts>.down_proj` [E, H, I], while the hub's checkpoints (and `save_pretrained`) store one matrix per
expert and projection: `<experts>.<e>.gate_proj.weight` [I, H], `<e>.up_proj.weight` [I, H],
`<e>.down_proj.weight` [H, I]. Expert e's matrix of a fused parameter is its parts stacked along their rows
in the order listed (gate above up: checked against `from_pretrained` in tests/test_loading.py).

A rank fills its block of a fused parameter (any offsets and sizes in all three dims; FSDP2 shards dim 0,
the experts) from exactly the rows of the per-expert tensors that block covers: `expert_requests` turns the
block into (checkpoint key, offsets, destination view) reads for the batched safetensors reader. A checkpoint
that stores the fused tensors themselves (longctx's own HF export does) loads by name without this.

Pure data and index arithmetic: no torch.distributed, no transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class FusedExperts:
    """Parameter `<module>.<name>` [experts, rows, cols], saved per expert as `<module>.<e>.<part>` with
    [rows / len(parts), cols] each, the parts stacked along the rows."""

    module: str
    name: str
    parts: tuple[str, ...]


QWEN3_MOE = (
    FusedExperts("mlp.experts", "gate_up_proj", ("gate_proj.weight", "up_proj.weight")),
    FusedExperts("mlp.experts", "down_proj", ("down_proj.weight",)),
)


def match(fqn: str, layout: tuple[FusedExperts, ...]) -> tuple[str, FusedExperts] | None:
    """(module prefix, spec) when `fqn` (a checkpoint-style name) is a fused expert parameter of `layout`."""
    for spec in layout:
        tail = f"{spec.module}.{spec.name}"
        if fqn == tail or fqn.endswith("." + tail):
            return fqn[: len(fqn) - len(spec.name) - 1], spec
    return None


def part_key(prefix: str, expert: int, part: str) -> str:
    return f"{prefix}.{expert}.{part}"


def expert_keys(prefix: str, spec: FusedExperts, experts: int) -> list[str]:
    """Every per-expert checkpoint key that a fused parameter with `experts` experts is assembled from."""
    return [part_key(prefix, e, part) for e in range(experts) for part in spec.parts]


def part_shape(spec: FusedExperts, shape: tuple[int, ...]) -> tuple[int, int]:
    """The saved shape of one expert's part for a fused parameter of `shape`."""
    experts, rows, cols = shape
    if rows % len(spec.parts):
        raise ValueError(f"{spec.name}: {rows} rows do not split into {len(spec.parts)} parts")
    return rows // len(spec.parts), cols


def expert_requests(
    prefix: str, spec: FusedExperts, shape: tuple[int, ...], offsets: tuple[int, ...], local: torch.Tensor
) -> list[tuple[str, tuple[int, int], torch.Tensor]]:
    """(key, offsets in the saved part, view of `local`) reads that fill `local`, the block of the fused
    parameter of global `shape` starting at `offsets`."""
    e0, r0, c0 = offsets
    rows = part_shape(spec, shape)[0]
    requests = []
    for i in range(local.shape[0]):
        for p, part in enumerate(spec.parts):
            lo, hi = max(r0, p * rows), min(r0 + local.shape[1], (p + 1) * rows)
            if lo < hi:  # this part's rows [lo, hi) of the fused matrix fall in the block
                out = local[i, lo - r0 : hi - r0]
                requests.append((part_key(prefix, e0 + i, part), (lo - p * rows, c0), out))
    return requests
