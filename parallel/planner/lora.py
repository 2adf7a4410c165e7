"""What LoRA (lora.r > 0) changes in the planner's memory and time model.

The base weights are frozen in the compute dtype: FSDP still shards and gathers them (b bytes per parameter
instead of 16 for fp32 master + fp32 grad + AdamW), but no base gradient, reduce-scatter or optimizer state
exists. Only the adapters - r * (in + out) parameters per adapted linear, fp32 masters - have gradients
(4 bytes) and AdamW moments (8 bytes). Backward skips the base weight-gradient matmuls: the frozen
projections and the LM head cost 4 * T * P FLOPs per pass (forward + input gradient) instead of 6 * T * P;
the adapters cost 6 * T * P_adapter. The adapters' own activations (each A's r outputs) add b * r per token
and adapted linear.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

# nn.Linear names of a Llama-family decoder layer -> (in, out) as functions of the shape and tp
_LINEARS = {
    "q_proj": lambda s, t: (s.hidden, s.heads // t * s.head_dim),
    "k_proj": lambda s, t: (s.hidden, s.kv_heads // t * s.head_dim),
    "v_proj": lambda s, t: (s.hidden, s.kv_heads // t * s.head_dim),
    "o_proj": lambda s, t: (s.heads // t * s.head_dim, s.hidden),
    "gate_proj": lambda s, t: (s.hidden, math.ceil(s.intermediate / t)),
    "up_proj": lambda s, t: (s.hidden, math.ceil(s.intermediate / t)),
    "down_proj": lambda s, t: (math.ceil(s.intermediate / t), s.hidden),
}


def adapted(targets: tuple[str, ...]) -> list[str]:
    """The decoder-layer linears the targets match (peft's suffix rule on the last name component)."""
    return [name for name in _LINEARS if any(t == name or t.endswith("." + name) for t in targets)]


def adapter_layer_params(shape: Any, rank: int, targets: tuple[str, ...], tp: int = 1) -> int:
    """Adapter parameters of one decoder layer: r * (in + out) per adapted linear."""
    return sum(rank * sum(_LINEARS[n](shape, tp)) for n in adapted(targets))


def adapter_activation_bytes(rank: int, targets: tuple[str, ...], nbytes: int) -> int:
    """Per token and layer: each adapted linear saves its A output (r values) for B's backward."""
    return nbytes * rank * len(adapted(targets))


def lora_settings(cfg: Any) -> tuple[int, tuple[str, ...]]:
    """(rank, target modules) of a run config's lora section; (0, ()) for full fine-tuning. With
    lora.adapter the adapter's own rank and targets apply, as in training."""
    lc = getattr(cfg, "lora", None)
    if lc is None or not (lc.r > 0 or lc.adapter):
        return 0, ()
    if lc.adapter:
        from parallel.dims import ConfigError

        try:
            with open(os.path.join(lc.adapter, "adapter_config.json")) as f:
                saved = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError("lora.adapter", f"cannot read its adapter_config.json: {exc}") from None
        return int(saved["r"]), tuple(saved.get("target_modules") or ())
    return lc.r, tuple(lc.target_modules)
