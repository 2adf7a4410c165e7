"""Command-line front-end: `train.py --config x.yaml [key=value ...] [--dry-run | --plan | --calibrate PATH |
--preprocess | --eval-only]`.

Bad configuration never reaches the user as a traceback: every ConfigError becomes one line
`config error: <key>: <why>` on stderr and exit code 2, before any process group or allocation exists.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from parallel.dims import ParallelDims
from parallel.planner import plan_main
from trainer.config import Config, ConfigError, config_to_dict, load_config
from trainer.config_docs import config_fields
from trainer.eval_checks import eval_enabled
from trainer.layout import RunLayout, check_paths, check_vocab, load_model_config, validate_run

# The embedded default (a tiny model on the shipped corpus): used when --config is not given.
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml"
)


@dataclass
class CliFlags:
    config: str | None = None
    """The YAML file actually loaded (None = schema defaults only)."""
    overrides: list[str] = field(default_factory=list)
    """`key=value` overrides in command-line order."""
    dry_run: bool = False
    plan: bool = False
    calibrate: str | None = None
    """Where --calibrate writes this machine's measured rates (None: no calibration)."""
    preprocess: bool = False
    eval_only: bool = False
    """Evaluate (eval section) the newest checkpoint or model.path; no optimizer, no training step."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line instead of argparse's usage dump, same exit code as a config error.
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _sections_help() -> str:
    sections: dict[str, list[str]] = {}
    for key, *_ in config_fields():
        head, _, leaf = key.rpartition(".")
        sections.setdefault(head or "(top level)", []).append(leaf)
    lines = ["config sections (full reference: docs/configuration.md):"]
    lines += [f"  {name}: {' '.join(keys)}" for name, keys in sections.items()]
    lines.append("precedence: key=value overrides > --config YAML > defaults")
    return "\n".join(lines)


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Long-context LLM training with context parallelism.",
        epilog=_sections_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="PATH", help=f"YAML config (default: {DEFAULT_CONFIG} if present)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. training.steps=10 parallel.cp=4",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate config, mesh and model shapes for WORLD_SIZE; no GPUs",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="rank every dp x tp x pp x cp layout for WORLD_SIZE GPUs by predicted memory and speed; no GPUs",
    )
    parser.add_argument(
        "--calibrate",
        metavar="PATH",
        help="measure this machine's rates for --plan into PATH (GPU; under torchrun also NCCL), then "
        "plan with parallel.plan_calibration=PATH",
    )
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        metavar="N",
        help="shorthand for parallel.gpus_per_node=N (the planner's node size)",
    )
    parser.add_argument("--preprocess", action="store_true", help="tokenise and cache the dataset, then exit")
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate the newest checkpoint in output_dir (or model.path) with the eval settings, then exit",
    )
    return parser


def parse_cli(argv: list[str]) -> tuple[Config, CliFlags]:
    """Parse argv (without the program name) into a validated Config and the flags."""
    args = build_parser().parse_intermixed_args(argv)
    path = args.config
    if path is None and os.path.isfile(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    overrides = list(args.overrides)
    if args.gpus_per_node is not None:
        overrides.append(f"parallel.gpus_per_node={args.gpus_per_node}")
    flags = CliFlags(
        config=path,
        overrides=overrides,
        dry_run=args.dry_run,
        plan=args.plan,
        calibrate=args.calibrate,
        preprocess=args.preprocess,
        eval_only=args.eval_only,
    )
    # A launch (or its dry run) checks the world-size product first; --plan sizes layouts for WORLD_SIZE
    # whatever the config's degrees, --preprocess and --calibrate use no layout.
    launches = not (flags.plan or flags.calibrate or flags.preprocess)
    world = _env_int("WORLD_SIZE", 1) if launches else None
    cfg = load_config(path, flags.overrides, world)
    if flags.eval_only and not eval_enabled(cfg):
        raise ConfigError("eval", "--eval-only needs eval.path (held-out data) or eval.passkey: true")
    return cfg, flags


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ConfigError(name, f"environment variable must be an integer, got {value!r}") from None


def _summary(run: RunLayout, notes: list[str]) -> str:
    cfg, dims, hf, shape = run.cfg, run.dims, run.hf_config, run.shape
    t, p = cfg.training, cfg.parallel
    tokens = t.seq_len * t.micro_batch_size * t.grad_accum * dims.dp
    lines = [
        "resolved config:",
        yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(),
        "",
        f"model: {hf.model_type}, {shape.layers} layers, hidden {shape.hidden}, "
        f"heads {shape.heads} (kv {shape.kv_heads}, head_dim {shape.head_dim})",
        f"mesh: {dims.describe()}",
        f"context parallel: {'on' if dims.cp_enabled else 'off'} (strategy {p.cp_strategy}, layout "
        f"{p.cp_layout}); {t.seq_len // dims.cp} tokens per cp rank",
        f"tokens per optimizer step: {tokens} (seq_len {t.seq_len} x micro_batch {t.micro_batch_size} "
        f"x grad_accum {t.grad_accum} x dp {dims.dp})",
        *(f"note: {n}" for n in notes),
        *(f"warning: {w}" for w in run.warnings),
        "",
        "rank -> mesh coordinates:",
        dims.rank_table(),
        "",
        "dry run OK (no process group created)",
    ]
    return "\n".join(lines)


def _local_tokenizer(cfg: Config) -> Any:
    """The run's tokenizer when it is a local directory (a hub id is not fetched by a dry run), else None."""
    from trainer.data import DataError, load_tokenizer

    name = cfg.model.tokenizer or cfg.model.path
    if not name or not os.path.isdir(name):
        return None
    try:
        return load_tokenizer(cfg)
    except DataError as exc:
        key, _, why = str(exc).partition(": ")
        raise ConfigError(key, why) from None


def dry_run(cfg: Config, world_size: int, rank: int = 0) -> ParallelDims:
    """Validate the run for `world_size` ranks as the trainer does (trainer/layout.validate_run), plus the
    local paths and the tokenizer's size, and print the plan on rank 0; no process group."""
    unchecked = check_paths(cfg)
    run = validate_run(cfg, world_size)
    tokenizer = _local_tokenizer(run.cfg)
    if tokenizer is None:
        unchecked.append("tokenizer size vs vocab_size not checked (the tokenizer is not a local directory)")
    else:
        check_vocab(run.cfg, run.hf_config, tokenizer)
    if rank == 0:
        print(_summary(run, run.notes + unchecked), flush=True)
    return run.dims


def calibrate_to(path: str) -> int:
    """--calibrate: parallel.planner.calibrate into a new file (an existing one is never overwritten)."""
    from parallel.planner.calibrate import main as calibrate_main

    if os.path.exists(path):
        raise ConfigError("--calibrate", f"{path} exists; remove it or choose another path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError("--calibrate", f"directory {parent} does not exist")
    code = calibrate_main(["--out", path])
    if code:
        raise SystemExit(code)
    return 0


def cli_main(argv: list[str], run_fn: Callable[[Config, CliFlags], Any]) -> Any:
    """Parse argv, then dry-run, plan or call `run_fn(cfg, flags)`; a ConfigError from any of them exits 2
    with one stderr line `config error: <key>: <why>` on every rank (under torchrun, one line per rank:
    a rank-specific error, such as a path one node cannot see, is then reported where it happened)."""
    try:
        rank = _env_int("RANK", 0)
        cfg, flags = parse_cli(argv)
        if flags.dry_run:
            dry_run(cfg, _env_int("WORLD_SIZE", 1), rank)
            return 0
        if flags.plan:
            if rank == 0:
                plan_main(cfg, _env_int("WORLD_SIZE", 1), load_model_config(cfg))
            return 0
        if flags.calibrate:
            return calibrate_to(flags.calibrate)
        return run_fn(cfg, flags)
    except ConfigError as exc:
        sys.stderr.write(f"config error: {exc}\n")
        sys.stderr.flush()
        from trainer.distributed import wait_for_peer_reports

        # torchrun SIGTERMs the ranks still alive once the first exits: this one has reported, so it ends
        # with the same code rather than as "killed by SIGTERM".
        signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(2))
        if wait_for_peer_reports(_env_int("WORLD_SIZE", 1)):
            from trainer.rank_failures import exit_now

            # Not SystemExit: interpreter shutdown restores the default SIGTERM action, and on a loaded
            # machine torchrun's SIGTERM (sent once the first rank is gone) lands inside that shutdown.
            exit_now(2)
        raise SystemExit(2) from None
