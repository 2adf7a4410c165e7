"""LoRA training (lora.r > 0 or lora.adapter): config checks, building the adapted model, and the exports.

The frozen base stays in model.dtype and is never checkpointed (it is rebuilt from model.path, and the
checkpoint's model-config hash says which base it belongs to); checkpoints hold the adapter weights and
their AdamW state. At the end the run writes `<output_dir>/adapter/` in PEFT format and, with
checkpoint.export_hf, the merged model (W + alpha/r * B @ A) to `<output_dir>/hf/`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from models import lora
from models.registry import DTYPES, build_hf_model
from parallel.dims import ConfigError
from trainer.checkpoint import _agreed, _all_gather, _barrier, _rank
from trainer.hf_export import export_hf
from trainer.lora_build import lora_stage_options
from trainer.metrics import flops_per_token

log = logging.getLogger("longctx")

# adapter_config.json fields whose non-default values change the math this trainer runs
_UNSUPPORTED = {
    "use_dora": False,
    "use_rslora": False,
    "modules_to_save": None,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "lora_bias": False,
    "target_parameters": None,
    "trainable_token_indices": None,
}


def lora_active(lcfg: Any) -> bool:
    return lcfg.r > 0 or bool(lcfg.adapter)


def validate_lora(cfg: Any) -> None:
    """Value checks of the lora section that need neither the model nor the world size."""
    lc, p = cfg.lora, cfg.parallel
    if lc.r < 0:
        raise ConfigError("lora.r", f"must be >= 0 (0 = off: full fine-tuning), got {lc.r}")
    if not lora_active(lc):
        return
    if not 0 <= lc.dropout < 1:
        raise ConfigError("lora.dropout", f"must be in [0, 1), got {lc.dropout}")
    if lc.alpha <= 0:
        raise ConfigError("lora.alpha", f"must be > 0, got {lc.alpha}")
    if not lc.target_modules:
        raise ConfigError(
            "lora.target_modules", "must name at least one linear layer (e.g. [q_proj, v_proj])"
        )
    if lc.adapter and not os.path.isdir(lc.adapter):
        raise ConfigError("lora.adapter", f"{lc.adapter} does not exist or is not a directory")
    if p.tp > 1:
        raise ConfigError(
            "parallel.tp",
            f"tp={p.tp} is not supported with LoRA (the adapters are not tensor-parallel); "
            "use cp and dp (FSDP2 shards the frozen base) or pp",
        )
    if p.engine != "fsdp2":
        raise ConfigError(
            "parallel.engine",
            f"LoRA runs on the fsdp2 engine only (got {p.engine}); FSDP2 already shards the frozen base over dp x cp",
        )


def lora_spec(lc: Any) -> lora.LoraSpec:
    """The adapter to train: lora.* values, or the settings of lora.adapter (which must not contradict them)."""
    targets = tuple(lc.target_modules)
    if not lc.adapter:
        return lora.LoraSpec(lc.r, float(lc.alpha), float(lc.dropout), targets)
    try:
        saved = lora.read_adapter_config(lc.adapter)
    except lora.LoraSpecError as exc:
        raise ConfigError(exc.key, str(exc)) from None
    for field, default in _UNSUPPORTED.items():
        if saved.get(field) not in (default, None, {}, []):
            raise ConfigError(
                "lora.adapter", f"{lc.adapter} sets {field}={saved[field]!r}, which longctx does not train"
            )
    saved_targets = saved.get("target_modules")
    if not isinstance(saved_targets, list):
        raise ConfigError(
            "lora.adapter", f"{lc.adapter}: target_modules must be a list of names, got {saved_targets!r}"
        )
    r = int(saved["r"])
    if lc.r not in (0, r):
        raise ConfigError(
            "lora.r", f"{lc.r} contradicts lora.adapter ({lc.adapter} has r={r}); leave lora.r at 0"
        )
    from trainer.config import LORA_TARGETS

    if list(lc.target_modules) != LORA_TARGETS and sorted(lc.target_modules) != sorted(saved_targets):
        raise ConfigError(
            "lora.target_modules",
            f"{list(lc.target_modules)} contradicts lora.adapter (it targets {sorted(saved_targets)}); leave the default",
        )
    return lora.LoraSpec(
        r,
        float(saved.get("lora_alpha", r)),
        float(saved.get("lora_dropout", 0.0)),
        tuple(saved_targets),
        lc.adapter,
    )


class LoraTraining:
    """Adapters train, the base is frozen (see the module docstring)."""

    name = "lora"

    def __init__(self, spec: lora.LoraSpec, model_dtype: torch.dtype, base_path: str | None):
        self.spec = spec
        self.model_dtype = model_dtype
        self.base_path = base_path

    @classmethod
    def from_config(cls, cfg: Any, hf_config: Any) -> LoraTraining:
        """Checks targets and the starting adapter against a meta-device copy of the model (no weights)."""
        from transformers import AutoModelForCausalLM

        spec = lora_spec(cfg.lora)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(hf_config)
        try:
            lora.check_targets(meta, spec.target_modules)
            if spec.adapter:
                lora.check_adapter_fits(meta, spec.adapter, spec)
        except lora.LoraSpecError as exc:
            raise ConfigError(exc.key, str(exc)) from None
        log.info(
            "LoRA: r=%d alpha=%g dropout=%g on %s%s; base frozen in %s",
            spec.r,
            spec.alpha,
            spec.dropout,
            ",".join(spec.target_modules),
            f", starting from {spec.adapter}" if spec.adapter else "",
            cfg.model.dtype,
        )
        return cls(spec, DTYPES[cfg.model.dtype], cfg.model.path)

    def stage_options(self) -> dict[str, Any]:
        # The frozen base needs no fp32 master: it is built in the compute dtype directly.
        return lora_stage_options(self.spec, self.model_dtype)

    def build_hf(self, model_cfg: Any, seed: int) -> nn.Module:
        hf = build_hf_model(model_cfg.path, model_cfg.config, dtype=self.model_dtype, seed=seed)
        torch.manual_seed(seed)  # the adapter's A init is random: identical on every rank
        return lora.apply_lora(hf, self.spec)

    def flops_per_token(self, hf_config: Any, seq_len: int) -> float:
        """Model FLOPs per token: the frozen matmuls run forward and input-gradient only (4 N instead of 6 N),
        the adapters all three (6 N_adapter); attention is unchanged."""
        full = flops_per_token(hf_config, seq_len)
        n_matmul = (full - 6 * hf_config.num_hidden_layers * _attn_width(hf_config) * seq_len) / 6
        return full - 2 * n_matmul + 6 * adapter_params(hf_config, self.spec)

    def export(self, engine: Any, hf_config: Any, tokenizer: Any, out_dir: Path, ckpt_cfg: Any) -> None:
        parts = [engine.stage]
        export_adapter(parts, self.spec, Path(out_dir) / "adapter", self.base_path)
        if ckpt_cfg.export_hf:
            merged = [merged_state_dict(p, self.spec.scaling) for p in parts]
            export_hf(
                parts, hf_config, tokenizer, Path(out_dir) / "hf", ckpt_cfg.export_dtype, state_dicts=merged
            )


def _attn_width(hf_config: Any) -> int:
    from models.registry import head_dim_of

    return hf_config.num_attention_heads * head_dim_of(hf_config)


def adapter_params(hf_config: Any, spec: lora.LoraSpec) -> int:
    """Adapter parameters of the whole model: r * (in + out) per adapted linear."""
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        meta = AutoModelForCausalLM.from_config(hf_config)
    return sum(
        spec.r * (m.in_features + m.out_features)
        for n, m in lora.linear_modules(meta).items()
        if any(lora.match(n, t) for t in spec.target_modules)
    )


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def export_adapter(parts: list[nn.Module], spec: lora.LoraSpec, out: Path, base_path: str | None) -> Path:
    """Collective. `out/adapter_config.json` + `out/adapter_model.safetensors` (fp32), loadable with
    `PeftModel.from_pretrained(base, out)`. The adapter is small: rank 0 gathers it whole and writes it."""
    from safetensors.torch import save_file

    opts = StateDictOptions(ignore_frozen_params=True)
    sds = [get_model_state_dict(p, options=opts) for p in parts]
    # The lowest rank holding a key (the first of each pipeline stage) sends it; full_tensor is collective.
    owners: dict[str, int] = {}
    for r, keys in enumerate(_all_gather(sorted({k for sd in sds for k in sd}))):
        for k in keys:
            owners.setdefault(k, r)
    mine = {}
    for sd in sds:
        for key, value in sd.items():
            full = _full(value.detach())
            if owners[key] == _rank():
                mine[lora.to_peft_key(key)] = full.to(device="cpu", dtype=torch.float32).contiguous().clone()
    gathered = [None] * dist.get_world_size() if _rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)

    def write() -> None:
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v for part in gathered for k, v in part.items()}
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        lora.write_adapter_config(spec, out, base_path)

    _agreed(write, f"LoRA adapter export to {out} failed", rank0_only=True)
    if _rank() == 0:
        log.info("exported the LoRA adapter (PEFT format) to %s", out)
    _barrier()
    return out


class _MergedView(Mapping):
    """A part's weights under their HF names with every adapter merged in (W + scaling * B @ A), still
    sharded as the base weight is. Each merged weight is computed when read, so the HF export (which
    gathers tensors one by one) never holds more than one extra weight. Reading is collective."""

    def __init__(self, part: nn.Module, scaling: float):
        self.sd = get_model_state_dict(part)
        self.scaling = scaling
        self.names = {lora.base_name(k): k for k in self.sd if not lora.is_adapter_param(k)}

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, distribute_tensor

        key = self.names[name]
        value = self.sd[key]
        pair = lora.lora_pair(key)
        if pair is None:
            return value
        delta = lora.merged_delta(_full(self.sd[pair[0]]), _full(self.sd[pair[1]]), self.scaling)
        if isinstance(value, DTensor):  # every rank computed the whole delta: each keeps its own shard
            delta = distribute_tensor(
                delta.to(value.device), value.device_mesh, value.placements, src_data_rank=None
            )
        return value.float() + delta


def merged_state_dict(part: nn.Module, scaling: float) -> Mapping[str, torch.Tensor]:
    """Collective when read: the part's merged weights under HF names (see _MergedView)."""
    return _MergedView(part, scaling)
