"""Value checks of a loaded Config that need no model (`validate`), the world-size product first.

Each failure is a ConfigError naming the key. The layout arithmetic itself (dp inference, Ulysses degree,
sequence divisibility) is parallel/dims.py's, shared with the mesh and the planner; checks that need the
model run in trainer/layout.validate_run.
"""

from __future__ import annotations

import difflib
import os
from typing import TYPE_CHECKING, Any

from models.families import FAMILIES, NOT_SUPPORTED
from models.fp8 import RECIPES as FP8_RECIPES
from parallel.dims import ConfigError, check_seq_len, data_parallel_degree, ulysses_degree
from trainer.ds_config import ENGINES, OFFLOAD_DEVICES, validate_engine
from trainer.eval_checks import validate_eval
from trainer.lora_kind import validate_lora

if TYPE_CHECKING:
    from trainer.config import Config

_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.attn_kernel": ("auto", "cudnn", "flash", "flash_attn", "cpu_flash", "math"),
    "data.format": ("auto", "text", "chat", "tokens"),
    "data.on_bad_row": ("error", "skip"),
    "parallel.cp_strategy": ("ring", "ulysses", "hybrid", "auto"),
    "parallel.cp_layout": ("zigzag", "contiguous"),
    "parallel.cp_accum": ("float32", "input"),
    "parallel.pp_schedule": ("1F1B", "GPipe"),
    "parallel.activation_checkpointing": ("none", "full", "selective", "full_keep_attn", "auto"),
    "training.device": ("auto", "cpu", "cuda"),
    "training.loss_impl": ("chunked", "fused", "liger"),
    "training.fp8_recipe": FP8_RECIPES,
    "optim.scheduler": ("constant", "linear", "cosine"),
    "checkpoint.export_dtype": ("float32", "bfloat16"),
    "parallel.engine": ENGINES,
    "deepspeed.offload_optimizer": OFFLOAD_DEVICES,
    "deepspeed.offload_params": OFFLOAD_DEVICES,
}
_POSITIVE = (
    "data.num_proc data.max_doc_tokens parallel.dp_replicate parallel.tp parallel.pp parallel.cp "
    "parallel.ulysses parallel.pp_microbatches parallel.gpus_per_node parallel.mlp_chunks parallel.ac_group "
    "training.seq_len "
    "training.micro_batch_size training.init_timeout_min training.step_timeout_min "
    "training.grad_accum training.steps training.loss_chunk logging.every"
).split()
_NON_NEGATIVE = (
    "training.seed training.max_grad_norm training.skip_nonfinite optim.lr optim.weight_decay "
    "optim.warmup_steps checkpoint.interval checkpoint.keep training.fp8_bf16_layers"
).split()
MODEL_TYPES = tuple(FAMILIES)


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


COMMAND_LINE = "the command line"


def value_source(cfg: Config, key: str) -> str | None:
    """Where `key` of a loaded config was set: COMMAND_LINE, the YAML file's path, or None (the default,
    or a config built in code)."""
    sources = getattr(cfg, "_sources", {})
    parts = key.split(".")
    for n in range(len(parts), 0, -1):  # `parallel={dp: 2}` sets parallel.dp too
        where = sources.get(".".join(parts[:n]))
        if where is not None:
            return where
    return None


def _origins(cfg: Config, names: tuple[str, ...]) -> str:
    """' (parallel.dp=2 from configs/demo.yaml, parallel.cp=3 from the command line)' for the degrees not
    left at their default; empty when all of those were typed on this command line (the user sees them)."""
    p = cfg.parallel
    set_ = [(n, getattr(p, n), value_source(cfg, f"parallel.{n}")) for n in names]
    set_ = [(n, v, src) for n, v, src in set_ if src is not None]
    if all(src == COMMAND_LINE for _, _, src in set_):
        return ""
    text = ", ".join(f"parallel.{n}={v} from {src}" for n, v, src in set_)
    if any(n == "dp" and src != COMMAND_LINE for n, _, src in set_):
        text += "; parallel.dp=-1 infers dp from the world size"
    return f" ({text})"


def check_world_size(cfg: Config, world_size: int) -> None:
    """dp*tp*pp*cp must be the world size; checked first, naming where each degree came from."""
    p = cfg.parallel
    if p.auto:
        return  # the planner chooses every degree
    try:
        data_parallel_degree(p.dp, p.tp, p.pp, p.cp, world_size)
    except ConfigError as exc:
        names = ("dp", "tp", "pp", "cp") if p.dp != -1 else ("tp", "pp", "cp")
        raise ConfigError(exc.key, exc.reason + _origins(cfg, names)) from None


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Raise ConfigError (naming the key) for the first value that cannot work. Values first, then (with
    `world_size`) the world-size product, then the layout arithmetic: a wrong product is reported before
    the sequence or Ulysses divisibility it makes meaningless."""
    _check_values(cfg)
    if world_size is not None:
        check_world_size(cfg, world_size)
    _check_layout(cfg)


def _check_values(cfg: Config) -> None:
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            lower = {c.lower(): c for c in choices}
            guess = [lower[g] for g in difflib.get_close_matches(str(value).lower(), list(lower), n=1)]
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            raise ConfigError(key, f"must be one of {' | '.join(choices)}, got {value!r}{hint}")
    for key in _POSITIVE:
        value = _get(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(key, f"must be >= 1, got {value}")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(key, f"must be >= 0, got {_get(cfg, key)}")

    m, p, o = cfg.model, cfg.parallel, cfg.optim
    if m.path is None and m.config is None:
        raise ConfigError(
            "model",
            "set model.path (pretrained), model.config (random init), or both (pretrained, with the "
            "model.config fields overridden, e.g. model.config.rope_parameters)",
        )
    if m.path is None and m.config.get("model_type") not in MODEL_TYPES:
        why = NOT_SUPPORTED.get(m.config.get("model_type"))
        raise ConfigError(
            "model.config.model_type",
            f"must be one of {' | '.join(MODEL_TYPES)}, got {m.config.get('model_type')!r}"
            + (f" ({why})" if why else ""),
        )
    if p.ac_group > 1 and p.activation_checkpointing != "full":
        raise ConfigError(
            "parallel.ac_group",
            f"groups of checkpointed layers need activation_checkpointing=full "
            f"(got {p.activation_checkpointing!r}); leave ac_group at 1",
        )
    if p.device_memory_gib is not None and p.device_memory_gib <= 0:
        raise ConfigError("parallel.device_memory_gib", f"must be > 0, got {p.device_memory_gib}")
    for key in ("optim.beta1", "optim.beta2"):
        if not 0 <= _get(cfg, key) < 1:
            raise ConfigError(key, f"must be in [0, 1), got {_get(cfg, key)}")
    if o.eps <= 0:
        raise ConfigError("optim.eps", f"must be > 0, got {o.eps}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not os.path.isdir(resume):
        raise ConfigError(
            "checkpoint.resume", f"must be auto | none | an existing checkpoint dir, got {resume!r}"
        )
    if not cfg.output_dir:
        raise ConfigError("output_dir", "must not be empty")
    if cfg.deepspeed.zero_stage not in (1, 2, 3):
        raise ConfigError("deepspeed.zero_stage", f"must be 1 | 2 | 3, got {cfg.deepspeed.zero_stage}")
    validate_engine(cfg)
    validate_eval(cfg)
    validate_lora(cfg)
    validate_fp8(cfg)
    validate_loss_impl(cfg)


def validate_fp8(cfg: Config) -> None:
    """training.fp8 needs torchao and the FSDP2 engine (what can be checked without the device)."""
    if not cfg.training.fp8:
        return
    from models.fp8 import torchao_missing

    if cfg.parallel.engine != "fsdp2":
        raise ConfigError("training.fp8", f"needs parallel.engine=fsdp2, got {cfg.parallel.engine!r}")
    missing = torchao_missing()
    if missing:
        raise ConfigError("training.fp8", missing)


def validate_device_features(cfg: Config, device: Any) -> None:
    """The device half of the training.fp8 and loss_impl=liger checks. `device`: a torch.device or a device
    type ("cpu" | "cuda"); a cuda run checked where no GPU is visible (a --dry-run on a login node) has
    its GPU checked again when it starts."""
    import torch

    device = torch.device(device)
    if cfg.training.fp8:
        from models.fp8 import device_problem

        problem = device_problem(device)
        if problem:
            raise ConfigError("training.fp8", problem)
    if cfg.training.loss_impl == "liger" and device.type != "cuda":
        raise ConfigError(
            "training.loss_impl", f"liger runs Triton kernels on CUDA only; this run is on {device.type}"
        )


def validate_loss_impl(cfg: Config) -> None:
    if cfg.training.loss_impl == "liger":
        from models.fused_loss import liger_missing

        missing = liger_missing()
        if missing:
            raise ConfigError("training.loss_impl", missing)


def _check_layout(cfg: Config) -> None:
    p, t = cfg.parallel, cfg.training
    if p.dp != -1 and p.dp < 1:
        raise ConfigError("parallel.dp", f"must be >= 1 or -1 (infer from world size), got {p.dp}")
    if p.dp != -1 and p.dp % p.dp_replicate:
        raise ConfigError("parallel.dp_replicate", f"must divide parallel.dp={p.dp}, got {p.dp_replicate}")
    if p.cp_strategy == "auto":
        if p.ulysses != 1:
            raise ConfigError("parallel.ulysses", "cp_strategy=auto picks the ulysses degree; leave it at 1")
    elif not p.auto or p.cp_strategy == "hybrid":  # parallel.auto replaces a pure strategy's ulysses
        ulysses_degree(p.cp_strategy, p.cp, p.ulysses)
    if not p.auto:  # parallel.auto replaces cp (and checks the new one)
        check_seq_len(t.seq_len, p.cp, p.tp, p.cp_layout, p.sequence_parallel)
