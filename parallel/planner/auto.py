"""`parallel.auto: true` and `parallel.cp_strategy: auto`: fill in the planner's best layout before the mesh exists."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from parallel.dims import ConfigError, ParallelDims
from parallel.planner.calibration import GIB
from parallel.planner.report import overrides_for, plan_rows

log = logging.getLogger(__name__)


def wants_auto(cfg: Any) -> bool:
    p = cfg.parallel
    return p.auto or p.cp_strategy == "auto"


def resolve_auto(cfg: Any, world_size: int, hf_config: Any) -> Any:
    """A new Config with the planner's best valid, fitting layout filled in (cfg itself if nothing is auto).

    parallel.auto=true chooses dp, tp, pp, cp, the CP strategy, the ulysses degree and the layout;
    cp_strategy=auto keeps the configured dp/tp/pp/cp and chooses only the CP strategy, ulysses degree
    and layout. The result has auto=false and a concrete cp_strategy, so ParallelDims accepts it and a
    second call is a no-op. Raises a one-line ConfigError when no layout is valid or none fits.
    """
    if not wants_auto(cfg):
        return cfg
    p = cfg.parallel
    whole = p.auto
    key = "parallel.auto" if whole else "parallel.cp_strategy"
    fixed = None
    if not whole:
        dims = ParallelDims.from_config(dataclasses.replace(p, cp_strategy="ring", ulysses=1), world_size)
        fixed = dict(dp=dims.dp, tp=dims.tp, pp=dims.pp, cp=dims.cp)
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
