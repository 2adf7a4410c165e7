"""Activation checkpointing policy: which decoder layers recompute their activations in backward."""

from __future__ import annotations

MODES = ("none", "full", "selective", "full_keep_attn")


def checkpointed_layers(layer_names: list[str], mode: str) -> set[str]:
    """full: every layer; selective: every other layer (half the recompute, about half the memory);
    full_keep_attn: every layer, but the attention output and LSE are kept (see `keeps_attention`)."""
    if mode == "none":
        return set()
    if mode in ("full", "full_keep_attn"):
        return set(layer_names)
    if mode == "selective":
        return set(layer_names[::2])
    raise ValueError(
        f"parallel.activation_checkpointing: unknown mode {mode!r}; choose from {', '.join(MODES)}"
    )


def keeps_attention(mode: str) -> bool:
    """full_keep_attn: the recompute skips the attention core (the costliest op at long context) and
    reuses its kept output - memory of one bf16 output + fp32 LSE per layer instead of a second attention."""
    return mode == "full_keep_attn"
