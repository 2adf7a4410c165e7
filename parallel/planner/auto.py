"""`parallel.auto: true`, `parallel.cp_strategy: auto` and `parallel.activation_checkpointing: auto`: fill
in the planner's best layout and checkpointing mode before the mesh exists."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from parallel.dims import ConfigError, ParallelDims
from parallel.planner.calibration import GIB
from parallel.planner.report import PlanRow, current_layout, overrides_for, plan_rows

log = logging.getLogger(__name__)

# activation_checkpointing=auto chooses among these (parallel/ac.py MODES) - with activation_offload only
# among the fully checkpointed ones: offload is for the checkpoints (without them every saved tensor would
# cross PCIe and wait in host memory, which the planner's step time does not price).
AC_CHOICES = ("none", "full_keep_attn", "selective", "full")
AC_CHOICES_OFFLOAD = ("full_keep_attn", "full")
# ... and only among modes predicted to use at most this share of the device: an out-of-memory error
# surfaces after the model is built and compiled; measured on one H200, the planner's peaks were at most
# 1.5% below the real ones (most were above).
AC_HEADROOM = 0.9


def wants_auto(cfg: Any) -> bool:
    p = cfg.parallel
    return p.auto or p.cp_strategy == "auto" or p.activation_checkpointing == "auto"


def resolve_auto(cfg: Any, world_size: int, hf_config: Any) -> Any:
    """A new Config with every `auto` of cfg.parallel filled in by the planner (cfg itself if none is):
    the checkpointing mode first (`resolve_checkpointing`), then the layout (`resolve_layout`)."""
    if cfg.parallel.activation_checkpointing == "auto":
        cfg = resolve_checkpointing(cfg, world_size, hf_config)
    if cfg.parallel.auto or cfg.parallel.cp_strategy == "auto":
        cfg = resolve_layout(cfg, world_size, hf_config)
    return cfg


def _with_checkpointing(cfg: Any, mode: str) -> Any:
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, activation_checkpointing=mode))


def _fixed_dims(cfg: Any, world_size: int) -> dict[str, int]:
    dims = ParallelDims.from_config(
        dataclasses.replace(cfg.parallel, cp_strategy="ring", ulysses=1), world_size
    )
    return dict(dp=dims.dp, tp=dims.tp, pp=dims.pp, cp=dims.cp)


def _within_headroom(row: PlanRow) -> bool:
    return (
        row.valid
        and row.memory is not None
        and row.memory.total <= AC_HEADROOM * row.limit_bytes
        and row.load_fits
    )


def _mode_rows(cfg: Any, world_size: int, hf_config: Any) -> tuple[PlanRow | None, PlanRow | None]:
    """(the row to run - the layout cfg asks for, or the fastest one when the layout is auto too - if it
    fits within the headroom, else None; the valid row of least memory, or None when no row is valid)."""
    p = cfg.parallel
    rows = plan_rows(cfg, world_size, hf_config, fixed=None if p.auto else _fixed_dims(cfg, world_size))
    want = current_layout(cfg, world_size)
    if want is not None:
        rows = [r for r in rows if r.layout == want]
    valid = [r for r in rows if r.valid and r.memory is not None]
    smallest = min(valid, key=lambda r: r.memory.total, default=None)
    return next((r for r in valid if _within_headroom(r)), None), smallest  # rows come fastest first


def resolve_checkpointing(cfg: Any, world_size: int, hf_config: Any) -> Any:
    """activation_checkpointing=auto: the mode of AC_CHOICES (AC_CHOICES_OFFLOAD with activation_offload)
    the planner predicts fastest among those that fit in AC_HEADROOM of the device memory, for the layout
    cfg asks for (each mode's best layout when that is auto too). Raises a one-line ConfigError when none fits; an invalid layout gets `full` here and its
    own error from the layout checks that follow."""
    options, smallest = [], []
    for mode in AC_CHOICES_OFFLOAD if cfg.parallel.activation_offload else AC_CHOICES:
        run, least = _mode_rows(_with_checkpointing(cfg, mode), world_size, hf_config)
        if run is not None:
            options.append((run, mode))
        if least is not None:
            smallest.append((least, mode))
    if not smallest:
        return _with_checkpointing(cfg, "full")
    if not options:
        least, mode = min(smallest, key=lambda o: o[0].memory.total)
        raise ConfigError(
            "parallel.activation_checkpointing",
            f"auto: no checkpointing mode fits in {AC_HEADROOM:.0%} of {least.limit_bytes / GIB:.3g} GiB/GPU "
            f"({mode} needs {least.memory.total_gib:.1f} GiB); try a shorter seq_len, more GPUs, "
            "parallel.ac_group / activation_offload with activation_checkpointing=full, or "
            "parallel.device_memory_gib for a larger GPU",
        )
    options.sort(key=lambda o: -o[0].time.tokens_per_s_per_gpu)
    (best, mode), rest = options[0], options[1:]
    why = (
        f"planner chose activation_checkpointing={mode}: predicted {best.memory.total_gib:.1f} GiB/GPU of "
        f"{best.limit_bytes / GIB:.0f}, {best.time.tokens_per_s_per_gpu:.0f} tokens/s/GPU"
    )
    if rest:
        gap = 1 - rest[0][0].time.tokens_per_s_per_gpu / best.time.tokens_per_s_per_gpu
        why += f"; next: {rest[0][1]} {gap:.0%} slower"
    log.info(why)
    return _with_checkpointing(cfg, mode)


def resolve_layout(cfg: Any, world_size: int, hf_config: Any) -> Any:
    """A new Config with the planner's best valid, fitting layout filled in (for parallel.auto or
    cp_strategy=auto).

    parallel.auto=true chooses dp, tp, pp, cp, the CP strategy, the ulysses degree and the layout;
    cp_strategy=auto keeps the configured dp/tp/pp/cp and chooses only the CP strategy, ulysses degree
    and layout. The result has auto=false and a concrete cp_strategy, so ParallelDims accepts it and a
    second call is a no-op. Raises a one-line ConfigError when no layout is valid or none fits.
    """
    p = cfg.parallel
    whole = p.auto
    key = "parallel.auto" if whole else "parallel.cp_strategy"
    fixed = None if whole else _fixed_dims(cfg, world_size)
    rows = plan_rows(cfg, world_size, hf_config, fixed=fixed)
    valid = [r for r in rows if r.valid]
    if not valid:
        why = rows[0].reason if rows else f"no layout of {world_size} ranks"
        raise ConfigError(key, f"no valid layout for {world_size} ranks (e.g. {why})")
    best = rows[0]
    if not best.fits:
        smallest = min(valid, key=lambda r: r.memory.total)
        raise ConfigError(
            key,
            f"no layout fits in {best.limit_bytes / GIB:.0f} GiB/GPU (smallest: {smallest.layout.label()} "
            f"{smallest.layout.strategy_label()} needs {smallest.memory.total_gib:.1f} GiB); try "
            "activation_checkpointing=full, a shorter seq_len or more GPUs",
        )
    fields = best.layout.parallel_fields()
    extra: dict[str, Any] = {"auto": False}
    if whole and p.dp_replicate != 1 and best.layout.dp % p.dp_replicate:
        extra["dp_replicate"] = 1
    new = dataclasses.replace(cfg, parallel=dataclasses.replace(p, **fields, **extra))
    fitting = [r for r in valid if r.fits]
    runner = next(
        (
            r
            for r in fitting[1:]
            if r.layout.strategy_label() != best.layout.strategy_label()
            or r.layout.label() != best.layout.label()
        ),
        None,
    )
    why = (
        f"planner chose {best.layout.label()} {best.layout.strategy_label()} ({overrides_for(best.layout)}): "
        f"predicted {best.memory.total_gib:.1f} GiB/GPU of {best.limit_bytes / GIB:.0f}, "
        f"{best.time.tokens_per_s_per_gpu:.0f} tokens/s/GPU, best of {len(fitting)} fitting layouts "
        f"({len(valid)} valid of {len(rows)})"
    )
    if runner is not None:
        gap = 1 - runner.time.tokens_per_s_per_gpu / best.time.tokens_per_s_per_gpu
        why += f"; next: {runner.layout.label()} {runner.layout.strategy_label()} {gap:.0%} slower"
    log.info(why)
    return new
