"""Activation checkpointing policy: which decoder layers recompute their activations in backward."""

from __future__ import annotations

MODES = ("none", "full", "selective")


def checkpointed_layers(layer_names: list[str], mode: str) -> set[str]:
    """full: every layer; selective: every other layer (half the recompute, about half the memory)."""
    if mode == "none":
        return set()
    if mode == "full":
        return set(layer_names)
    if mode == "selective":
        return set(layer_names[::2])
    raise ValueError(
        f"parallel.activation_checkpointing: unknown mode {mode!r}; choose from {', '.join(MODES)}"
    )
