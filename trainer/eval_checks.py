"""Checks of the `eval` section that need no model and no process group (part of config validation).

`validate_eval` runs with every config load (so `--dry-run` catches the same errors as a launch) and
again once `parallel.auto` has fixed the CP degree (`cp` argument)."""

from __future__ import annotations

from typing import Any

from parallel.dims import ConfigError


def eval_enabled(cfg: Any) -> bool:
    return cfg.eval.path is not None or cfg.eval.passkey


def passkey_lengths(cfg: Any) -> list[int]:
    return list(cfg.eval.passkey_lengths or [cfg.training.seq_len])


def validate_eval(cfg: Any, cp: int | None = None) -> None:
    """Raise ConfigError (naming the key) for an `eval` value that cannot work."""
    e, p, t = cfg.eval, cfg.parallel, cfg.training
    if e.every < 0:
        raise ConfigError("eval.every", f"must be >= 0, got {e.every}")
    if e.max_sequences is not None and e.max_sequences < 1:
        raise ConfigError("eval.max_sequences", f"must be >= 1 or null (all), got {e.max_sequences}")
    if e.path is not None:
        from trainer.data.sources import DataError, resolve_source

        try:
            resolve_source(e.path)
        except DataError as exc:
            raise ConfigError("eval.path", str(exc).removeprefix("data.path: ")) from None
    if not eval_enabled(cfg):
        return
    if p.pp > 1:
        raise ConfigError("eval", "evaluation does not run under pipeline parallelism (parallel.pp > 1) yet")
    if p.engine != "fsdp2":
        raise ConfigError("eval", f"evaluation runs with parallel.engine=fsdp2, got {p.engine!r}")
    if not e.passkey:
        return
    if not e.passkey_depths:
        raise ConfigError("eval.passkey_depths", "must list at least one depth")
    for d in e.passkey_depths:
        if not 0.0 <= d <= 1.0:
            raise ConfigError("eval.passkey_depths", f"depths are fractions in [0, 1], got {d}")
    if p.auto and cp is None:
        return  # the planner picks cp; checked again with its choice
    cp = p.cp if cp is None else cp
    chunks = 2 * cp if p.cp_layout == "zigzag" else cp
    sp = p.tp if p.sequence_parallel and p.tp > 1 else 1  # sequence parallel splits each CP shard over tp
    need = chunks * sp
    for n in passkey_lengths(cfg):
        if not 1 <= n <= t.seq_len:
            raise ConfigError(
                "eval.passkey_lengths", f"{n} is outside 1..training.seq_len={t.seq_len} (the trained length)"
            )
        if n % need:
            extra = f", tp={p.tp} with sequence_parallel" if sp > 1 else ""
            raise ConfigError(
                "eval.passkey_lengths",
                f"{n} is not divisible by {need} (cp={cp}, cp_layout={p.cp_layout}{extra})",
            )
