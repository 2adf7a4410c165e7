"""The one validation of a run: `validate_run(cfg, world_size, hf_config) -> RunLayout`.

Every check that can reject a run lives behind it, in this order: the world-size product (naming where
each degree came from), the config's value checks (trainer/config_checks.py), parallel.auto /
cp_strategy=auto resolution (the planner), the mesh degrees (parallel/dims.py), the supported model
families, then the model- and device-dependent layout checks (parallel/layout_checks.py); `check_vocab`
then checks the tokenizer's size against the model's embedding. The Trainer, `--dry-run` and `--plan` (through the
same layout checks) all run it, so "dry run OK" means the trainer accepts the layout. A rejection is a
ConfigError: one line `config error: <key>: <why>`, exit code 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from parallel.dims import ParallelDims
from parallel.layout_checks import RunSettings, check_layout
from parallel.planner import resolve_auto, wants_auto
from parallel.shape import ModelShape
from trainer.config import MODEL_TYPES, Config, ConfigError, validate
from trainer.config_checks import validate_device_features

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class RunLayout:
    """A validated run: the config with auto choices filled in, its mesh degrees and the model shape."""

    cfg: Config
    dims: ParallelDims
    hf_config: Any
    shape: ModelShape
    notes: list[str] = field(default_factory=list)
    """Facts worth logging (KV-head replication, seq_len beyond max_position_embeddings)."""
    warnings: list[str] = field(default_factory=list)
    """Likely mistakes that do not stop the run (a demo tokenizer next to a model that ships its own)."""
    kind: Any = None
    """What trains: full fine-tuning or LoRA (trainer/training_kind.py), its settings checked against the model."""


def load_model_config(cfg: Config) -> Any:
    """The HF PretrainedConfig of `model.path` or of the inline `model.config` (no weights are loaded)."""
    from models.registry import load_hf_config

    try:
        return load_hf_config(cfg.model.path, cfg.model.config)
    except ConfigError:
        raise  # a model.config override the pretrained model cannot take: already names its field
    except Exception as exc:  # noqa: BLE001 - HF raises many types for the same mistake; the user needs one line
        key = "model.path" if cfg.model.path is not None else "model.config"
        raise ConfigError(key, f"cannot load HF config: {' '.join(str(exc).split())}") from None


def run_device_type(requested: str) -> str:
    """cpu | cuda: where a run with training.device=`requested` trains (as trainer.distributed.pick_device)."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_settings(cfg: Config, device_type: str | None) -> RunSettings:
    t, p = cfg.training, cfg.parallel
    return RunSettings(
        seq_len=t.seq_len,
        sequence_parallel=p.sequence_parallel,
        cp_layout=p.cp_layout,
        sequences_per_step=t.grad_accum * t.micro_batch_size,
        pp_microbatches=p.pp_microbatches,
        pp_schedule=p.pp_schedule,
        attn_kernel=cfg.model.attn_kernel,
        device_type=device_type,
    )


def validate_run(
    cfg: Config,
    world_size: int,
    hf_config: Any = None,
    *,
    device_type: str | None = None,
) -> RunLayout:
    """Check `cfg` for `world_size` ranks and return the validated layout, or raise the first ConfigError.

    `hf_config` None: loaded from model.path / model.config. `device_type` None: from training.device.
    The tokenizer, loaded after this (the slowest and the last check), goes through `check_vocab`."""
    validate(cfg, world_size)
    hf = load_model_config(cfg) if hf_config is None else hf_config
    if wants_auto(cfg):
        cfg = resolve_auto(cfg, world_size, hf)
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    from models.registry import check_supported

    # families and the features the CP attention cannot honour, each naming its field (models/families.py)
    family_notes = check_supported(
        hf,
        cfg.training.seq_len,
        tp=dims.tp,
        sequence_parallel=cfg.parallel.sequence_parallel,
        pretrained=cfg.model.path is not None,
    )
    model_type = getattr(hf, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            "model.path" if cfg.model.path else "model.config.model_type",
            f"model_type {model_type!r} is not supported; choose from {' | '.join(MODEL_TYPES)}",
        )
    shape = ModelShape.from_hf(hf)
    if cfg.training.fp8 and 2 * cfg.training.fp8_bf16_layers >= shape.layers:
        raise ConfigError(
            "training.fp8_bf16_layers",
            f"{cfg.training.fp8_bf16_layers} at each end leaves none of the model's {shape.layers} layers in FP8",
        )
    device = run_device_type(cfg.training.device) if device_type is None else device_type
    notes = family_notes + check_layout(dims, shape, run_settings(cfg, device))
    validate_device_features(cfg, device)  # training.fp8 (an FP8 GPU), loss_impl=liger (CUDA)
    from trainer.training_kind import training_kind

    kind = training_kind(cfg, hf)  # LoRA targets and starting adapter against the model (no weights)
    return RunLayout(cfg, dims, hf, shape, notes, tokenizer_warnings(cfg), kind)


def check_vocab(cfg: Config, hf_config: Any, tokenizer: Any) -> None:
    """Every token id the tokenizer can produce must have an embedding row (else an IndexError, or a
    device-side assert on GPUs, in the first forward)."""
    size, rows = len(tokenizer), hf_config.vocab_size
    if size > rows:
        name = cfg.model.tokenizer or cfg.model.path
        key = "model.config.vocab_size" if cfg.model.config is not None else "model.tokenizer"
        raise ConfigError(
            key,
            f"the tokenizer {name!r} has {size} tokens but the model's embedding has vocab_size={rows} rows; "
            f"use the model's own tokenizer or a vocab_size >= {size}",
        )


def tokenizer_warnings(cfg: Config) -> list[str]:
    """model.path ships a tokenizer but model.tokenizer points elsewhere (configs/demo.yaml reused with
    model.path=<dir> keeps the demo tokenizer): likely a mistake, said loudly."""
    path, tok = cfg.model.path, cfg.model.tokenizer
    if not path or not tok or not os.path.isdir(path):
        return []
    if os.path.abspath(tok) == os.path.abspath(path):
        return []
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return []
    return [
        f"model.tokenizer={tok} is used, but model.path={path} ships its own tokenizer; set "
        f"model.tokenizer=null to use the model's (configs/demo.yaml sets the demo tokenizer)"
    ]


def _looks_local(path: str) -> bool:
    """A path the user means as a local file or directory (a hub id is `name` or `owner/name`)."""
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1:
        return True
    return os.path.splitext(path)[1] in (".json", ".jsonl", ".parquet", ".txt", ".yaml", ".arrow", ".csv")


def check_paths(cfg: Config) -> list[str]:
    """--dry-run: model.path, the tokenizer and data.path must exist where they are local paths.

    Returns notes on those taken as hub ids (not checked here); a missing local path is a ConfigError."""
    unchecked = []
    tok_key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
    for key, path in (
        ("model.path", cfg.model.path),
        (tok_key, cfg.model.tokenizer or cfg.model.path),
        ("data.path", cfg.data.path),
    ):
        if not path or os.path.exists(os.path.expanduser(path)):
            continue
        if _looks_local(path):
            # (model.path's wording is the one its config loader gives for the same mistake)
            raise ConfigError(
                key, ("cannot load HF config: " if key == "model.path" else "") + f"{path} does not exist"
            )
        unchecked.append(f"{key}={path} is taken as a hub id; not checked here")
    return list(dict.fromkeys(unchecked))
