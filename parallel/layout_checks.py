"""Every check a layout must pass once its degrees are known, on typed arguments.

`check_layout` runs, in this order: the model's shapes against the mesh (ParallelDims.validate_model), model
features the CP attention cannot honour (sliding windows, dropout: the one copy of those checks), the attention kernel for the run's device, and the pipeline's
micro-batches. trainer/layout.validate_run calls it for the run, and the planner (parallel/planner/
enumerate.py) for every candidate, so a reason the planner prints is the error the trainer raises.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.dims import ConfigError, ParallelDims
from parallel.shape import ModelShape


@dataclass(frozen=True)
class RunSettings:
    """The non-layout settings the layout checks read (from training.*, parallel.*, model.*)."""

    seq_len: int
    sequence_parallel: bool = False
    cp_layout: str = "zigzag"
    sequences_per_step: int | None = None
    """grad_accum * micro_batch_size; None (a plan without a batch): the micro-batch checks are skipped."""
    pp_microbatches: int | None = None
    pp_schedule: str = "1F1B"
    attn_kernel: str = "auto"
    device_type: str | None = None
    """cpu | cuda, where the run trains; None (the planner): the kernel is not checked."""


def strategy_of(dims: ParallelDims) -> str:
    """ring | ulysses | hybrid, as parallel.cp_strategy spells the split of `dims` (ring when cp == 1)."""
    if dims.ulysses == 1:
        return "ring"
    return "ulysses" if dims.ulysses == dims.cp else "hybrid"


def check_layout(dims: ParallelDims, model: ModelShape, run: RunSettings) -> list[str]:
    """Raise the first ConfigError of `dims` for this model and run; return the notes worth logging."""
    notes = dims.validate_model(model, run.seq_len, run.sequence_parallel, strategy_of(dims), run.cp_layout)
    check_features(model, run.seq_len)
    check_kernel(run.attn_kernel, run.device_type)
    check_pipeline(dims.pp, model, run)
    return notes


def check_features(model: ModelShape, seq_len: int) -> None:
    """Reject model features the CP attention would silently ignore."""
    if model.sliding_window and seq_len > model.sliding_window:
        raise ConfigError(
            "model.config.sliding_window",
            f"sliding-window attention ({model.sliding_window} tokens) is not supported by longctx attention "
            f"and training.seq_len={seq_len} exceeds it; for full causal attention set sliding_window to at "
            f"least {seq_len} (or null where the family allows it)",
        )
    if model.attention_dropout:
        raise ConfigError("model.config.attention_dropout", "longctx attention has no dropout; set it to 0")


def check_kernel(name: str, device_type: str | None) -> None:
    """A forced kernel that cannot run on the run's device fails now, not in the first forward."""
    if name == "auto" or device_type is None:
        return  # auto always finds a kernel
    import torch

    from parallel.cp.kernels import select_kernel

    try:  # a forced kernel's availability depends only on the device type and installed packages
        select_kernel(name, torch.device(device_type), torch.float32, 64)
    except ValueError as exc:
        raise ConfigError("model.attn_kernel", str(exc)) from None


def check_pipeline(pp: int, model: ModelShape, run: RunSettings) -> None:
    """Pipeline stages cannot share tied embeddings, and a step must split into enough micro-batches."""
    if pp == 1:
        return
    if model.tied:
        raise ConfigError("parallel.pp", "tied input/output embeddings live on different stages")
    per_step = run.sequences_per_step
    if per_step is None:
        return
    micro = run.pp_microbatches or per_step
    if per_step % micro:
        raise ConfigError(
            "parallel.pp_microbatches",
            f"{run.pp_microbatches} does not divide grad_accum * micro_batch_size = {per_step} sequences per step",
        )
    if run.pp_schedule == "1F1B" and micro < pp:
        raise ConfigError(
            "parallel.pp_microbatches",
            f"1F1B needs at least pp={pp} micro-batches per step, got {micro} "
            "(raise training.grad_accum or micro_batch_size, or use parallel.pp_schedule=GPipe)",
        )
