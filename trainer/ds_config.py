"""The DeepSpeed config dict longctx hands to `deepspeed.initialize` (no deepspeed import here).

Some values are decided by the run config and nowhere else: micro batch, gradient accumulation, clipping,
precision, ZeRO stage and offload devices. A user ds_config JSON (`deepspeed.config`) is merged on top of
them: a key that is missing or `"auto"` (the convention of HF-style ds_config files) takes longctx's value,
an equal value is fine, any other value is a ConfigError naming both keys. Everything else in the file
(bucket sizes, overlap_comm, prefetch, pinning, ...) passes through to DeepSpeed untouched.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from parallel.dims import ConfigError

ENGINES = ("fsdp2", "deepspeed")
OFFLOAD_DEVICES = ("none", "cpu")
AUTO = "auto"
_KEY = "deepspeed.config"
# DeepSpeed never prints its throughput line unless asked: longctx logs its own metrics.
_QUIET_STEPS = 2**31 - 1


def read_user_config(path: str) -> dict[str, Any]:
    """The user's ds_config JSON as a dict; one-line ConfigError if it is missing or malformed."""
    if not os.path.isfile(path):
        raise ConfigError(_KEY, f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(_KEY, f"invalid JSON in {path} at line {exc.lineno}: {exc.msg}") from None
    except OSError as exc:
        raise ConfigError(_KEY, f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(_KEY, f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def derived_values(cfg: Any) -> list[tuple[str, Any, str, Any]]:
    """(ds_config dotted path, its value, the longctx key it comes from, that key's value) for every value
    longctx decides."""
    t, d, dtype = cfg.training, cfg.deepspeed, cfg.model.dtype
    return [
        (
            "train_micro_batch_size_per_gpu",
            t.micro_batch_size,
            "training.micro_batch_size",
            t.micro_batch_size,
        ),
        ("gradient_accumulation_steps", t.grad_accum, "training.grad_accum", t.grad_accum),
        ("gradient_clipping", t.max_grad_norm, "training.max_grad_norm", t.max_grad_norm),
        ("bf16.enabled", dtype == "bfloat16", "model.dtype", dtype),
        ("fp16.enabled", False, "model.dtype", dtype),
        ("zero_optimization.stage", d.zero_stage, "deepspeed.zero_stage", d.zero_stage),
        (
            "zero_optimization.offload_optimizer.device",
            d.offload_optimizer,
            "deepspeed.offload_optimizer",
            d.offload_optimizer,
        ),
        (
            "zero_optimization.offload_param.device",
            d.offload_params,
            "deepspeed.offload_params",
            d.offload_params,
        ),
    ]


def _lookup(tree: dict, path: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _assign(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _same(user: Any, ours: Any) -> bool:
    if isinstance(ours, bool) or isinstance(user, bool):
        return user is ours
    if isinstance(ours, (int, float)) and isinstance(user, (int, float)):
        return float(user) == float(ours)
    return user == ours


def _conflict(path: str, user: Any, longctx_key: str, ours: Any, source: str) -> ConfigError:
    return ConfigError(
        _KEY,
        f"{path}={json.dumps(user)} in {source} conflicts with {longctx_key}={json.dumps(ours)}; "
        f'remove it, set it to "auto" or make the two equal',
    )


def _check_optimizer(section: Any, cfg: Any, source: str) -> None:
    """An `optimizer` section may only restate AdamW with optim.* values (or "auto"): longctx builds it."""
    o = cfg.optim
    if not isinstance(section, dict):
        raise ConfigError(_KEY, f"optimizer in {source} must be an object")
    kind = str(section.get("type", AUTO))
    if kind != AUTO and kind.lower() != "adamw":
        raise ConfigError(
            _KEY,
            f"optimizer.type={json.dumps(kind)} in {source} conflicts with longctx's AdamW (optim.*); "
            "remove the optimizer section",
        )
    ours = {
        "lr": (o.lr, "optim.lr"),
        "betas": ([o.beta1, o.beta2], "optim.beta1/optim.beta2"),
        "eps": (o.eps, "optim.eps"),
        "weight_decay": (o.weight_decay, "optim.weight_decay"),
    }
    for name, value in (section.get("params") or {}).items():
        if value == AUTO:
            continue
        if name not in ours:
            raise ConfigError(
                _KEY, f"optimizer.params.{name} in {source} has no longctx equivalent; remove it"
            )
        mine, key = ours[name]
        same = (
            isinstance(value, list) and [float(v) for v in value] == [float(v) for v in mine]
            if name == "betas"
            else _same(value, mine)
        )
        if not same:
            raise _conflict(f"optimizer.params.{name}", value, key, mine, source)


def _check_scheduler(section: Any, source: str) -> None:
    params = section.get("params", {}) if isinstance(section, dict) else None
    if not isinstance(params, dict) or any(v != AUTO for v in params.values()):
        raise ConfigError(
            _KEY,
            f"scheduler in {source} conflicts with optim.scheduler / optim.warmup_steps (longctx schedules "
            'the learning rate); remove the scheduler section or set all its params to "auto"',
        )


def _find_auto(tree: Any, prefix: str = "") -> str | None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            found = _find_auto(value, f"{prefix}{key}.")
            if found:
                return found
    elif tree == AUTO:
        return prefix.rstrip(".")
    return None


def build_ds_config(cfg: Any, dp_cp_size: int | None = None) -> dict[str, Any]:
    """The merged ds_config for this run. `dp_cp_size` (DeepSpeed's data-parallel world: dp x cp) fills
    `train_batch_size`; without it (config-time validation) a user value for it is left unchecked."""
    d = cfg.deepspeed
    source = d.config or "the ds_config"
    user = read_user_config(d.config) if d.config else {}
    merged = copy.deepcopy(user)
    for section, check in (("optimizer", _check_optimizer), ("scheduler", _check_scheduler)):
        if section in merged:
            check(merged.pop(section), *((cfg, source) if section == "optimizer" else (source,)))
    for path, ours, key, shown in derived_values(cfg):
        present, value = _lookup(merged, path)
        if present and value != AUTO and not _same(value, ours):
            raise _conflict(path, value, key, shown, source)
        _assign(merged, path, ours)
    # DeepSpeed's train_batch_size counts samples over its whole data-parallel group (dp x cp here,
    # although CP ranks share their samples): micro x accumulation x dp x cp.
    t = cfg.training
    present, value = _lookup(merged, "train_batch_size")
    if dp_cp_size is not None:
        expected = t.micro_batch_size * t.grad_accum * dp_cp_size
        if present and value != AUTO and not _same(value, expected):
            raise _conflict(
                "train_batch_size",
                value,
                "training.micro_batch_size x training.grad_accum x dp x cp",
                expected,
                source,
            )
        merged["train_batch_size"] = expected
    elif present and value == AUTO:
        del merged["train_batch_size"]
    leftover = _find_auto(merged)
    if leftover:
        raise ConfigError(
            _KEY, f'{leftover} is "auto" in {source} but longctx derives no value for it; set one'
        )
    merged.setdefault("steps_per_print", _QUIET_STEPS)
    merged.setdefault("wall_clock_breakdown", False)
    # longctx passes its own optimizer (torch AdamW or DeepSpeedCPUAdam): let DeepSpeed take either.
    merged.setdefault("zero_allow_untested_optimizer", True)
    merged.setdefault("zero_force_ds_cpu_optimizer", False)
    if cfg.model.dtype == "bfloat16":
        # Reduce gradients in fp32 like the FSDP2 path (reduce_dtype=float32); "bf16" halves the traffic.
        merged.setdefault("communication_data_type", "fp32")
    return merged


def validate_engine(cfg: Any) -> None:
    """Config-time checks of parallel.engine and the deepspeed section (no deepspeed import)."""
    p, d = cfg.parallel, cfg.deepspeed
    if p.engine != "deepspeed":
        return
    if p.tp > 1 or p.pp > 1:
        which = "parallel.tp" if p.tp > 1 else "parallel.pp"
        raise ConfigError(
            which,
            f"{which.split('.')[1]}={p.tp if p.tp > 1 else p.pp} needs parallel.engine=fsdp2: the deepspeed "
            "engine supports dp x cp layouts (every CP strategy) only; fsdp2 composes with TP and PP",
        )
    if p.auto:
        raise ConfigError(
            "parallel.auto",
            "the planner may pick tp/pp, which parallel.engine=deepspeed does not support; set parallel.dp "
            "and parallel.cp by hand (cp_strategy=auto still works)",
        )
    if p.dp_replicate != 1:
        raise ConfigError(
            "parallel.dp_replicate",
            "HSDP is an fsdp2 feature; with parallel.engine=deepspeed leave it at 1 (ZeRO shards over dp x cp)",
        )
    if p.fsdp_cpu_offload:
        raise ConfigError(
            "parallel.fsdp_cpu_offload",
            "is the fsdp2 offload switch; with parallel.engine=deepspeed use deepspeed.offload_optimizer "
            "and deepspeed.offload_params",
        )
    if d.offload_params != "none" and d.zero_stage != 3:
        raise ConfigError(
            "deepspeed.offload_params",
            f"parameter offload needs deepspeed.zero_stage=3 (got {d.zero_stage}); use offload_optimizer "
            "with stages 1 and 2",
        )
    if cfg.checkpoint.async_save:
        raise ConfigError(
            "checkpoint.async_save",
            "not available with parallel.engine=deepspeed (DeepSpeed writes its checkpoints synchronously); "
            "set it to false",
        )
    build_ds_config(cfg)  # conflicts with the user's ds_config surface before anything is allocated
