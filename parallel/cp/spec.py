"""CPSpec: what a model stage holds of its context parallelism (set by `parallel.cp.api.apply_cp`).

Kept free of torch.distributed so single-device model code (models/causal_lm.py) can name the type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class CPSpec:
    """How attention is split across ranks; `make_context(seq_len, doc_ids)` builds the per-batch context."""

    make_context: Any  # Callable[[int, Tensor | None], CPContext]
    seq_shards: int  # the factor by which the local sequence is shorter than the full one
    max_position: Any = None  # Callable[[Tensor], Tensor]: a rank's largest position -> the CP group's
