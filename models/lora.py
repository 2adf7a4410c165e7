"""LoRA adapters on a single-device Hugging Face causal LM, through peft.

peft injects its `LoraLayer` wrappers into the decoder layers in place (`q_proj` becomes a module holding
`base_layer`, `lora_A.default`, `lora_B.default`), so the model `CausalLMStage` slices afterwards already
carries the adapters and every parallelism applied to the stage (CP attention, checkpointing, compile, FSDP2)
sees them as ordinary submodules. The trainer injects them into the meta-device model (`inject_lora`) and
fills the values later, shard by shard (`fresh_adapter` gives peft's initial A and B of one layer). This
module also translates between the live parameter names and the two
formats a run writes: a PEFT adapter directory and merged HF weights.

Single-device code: no process groups here (trainer/lora_kind.py gathers sharded tensors).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name; a run trains exactly one adapter
_PEFT_PREFIX = "base_model.model."  # how peft prefixes keys in adapter_model.safetensors


@dataclass(frozen=True)
class LoraSpec:
    """The adapter a run trains: its rank, scaling, dropout, targets and (optionally) where it starts from."""

    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    adapter: str | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraSpecError(ValueError):
    """Bad LoRA settings or adapter; `key` is the config key to name, the message says why."""

    def __init__(self, key: str, why: str):
        super().__init__(why)
        self.key = key


def read_adapter_config(path: str) -> dict:
    """adapter_config.json of a PEFT adapter directory (raises LoraSpecError naming lora.adapter)."""
    cfg_file = Path(path) / "adapter_config.json"
    if not cfg_file.is_file():
        raise LoraSpecError(
            "lora.adapter", f"{path} is not a PEFT adapter directory (no adapter_config.json)"
        )
    try:
        data = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise LoraSpecError("lora.adapter", f"cannot read {cfg_file}: {exc}") from None
    if data.get("peft_type", "LORA") != "LORA":
        raise LoraSpecError("lora.adapter", f"{path} holds a {data.get('peft_type')} adapter, not LoRA")
    return data


def match(name: str, target: str) -> bool:
    """peft's rule for a list of target modules: the full name or its last dotted components."""
    return name == target or name.endswith("." + target)


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the HF model by name (works on a meta-device model)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    """Every target names at least one Linear inside the decoder layers and none outside them: the
    embedding and LM head are run by the chunked loss and the stage itself, which would skip an adapter."""
    linears = linear_modules(model)
    inside = sorted({n.rsplit(".", 1)[-1] for n in linears if ".layers." in f".{n}"})
    for target in targets:
        hits = [n for n in linears if match(n, target)]
        if not hits:
            raise LoraSpecError(
                "lora.target_modules",
                f"{target!r} names no linear layer of this model; choose from {', '.join(inside)}",
            )
        outside = [n for n in hits if ".layers." not in f".{n}"]
        if outside:
            raise LoraSpecError(
                "lora.target_modules",
                f"{target!r} matches {outside[0]}, outside the decoder layers; adapters go on {', '.join(inside)}",
            )


def check_adapter_fits(model: nn.Module, adapter_dir: str, spec: LoraSpec) -> None:
    """Every tensor of the adapter file belongs to a targeted linear of this model with matching shapes
    (an adapter trained for another base model is rejected here, before any weights are loaded)."""
    from safetensors import safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoraSpecError("lora.adapter", f"{adapter_dir} has no adapter_model.safetensors")
    linears = linear_modules(model)
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            module, kind = _peft_key_module(key)
            base = linears.get(module)
            if base is None:
                raise LoraSpecError(
                    "lora.adapter",
                    f"{adapter_dir} is for another base model: it adapts {module}, which this model lacks",
                )
            want = (spec.r, base.in_features) if kind == "lora_A" else (base.out_features, spec.r)
            if shape != want:
                raise LoraSpecError(
                    "lora.adapter",
                    f"{adapter_dir} is for another base model: {key} is {list(shape)}, this model needs {list(want)}",
                )


def _peft_key_module(key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight' -> ('model.layers.0.mlp.up_proj', 'lora_A')."""
    name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
    for kind in ("lora_A", "lora_B"):
        marker = f".{kind}."
        if marker in name:
            return name.split(marker)[0], kind
    raise LoraSpecError(
        "lora.adapter", f"unexpected tensor {key} in the adapter (only LoRA A/B weights are supported)"
    )


def peft_config(spec: LoraSpec, base_model: str | None = None):
    """The peft.LoraConfig of `spec` (bias stays frozen: only A and B train)."""
    import peft

    return peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def apply_lora(hf_model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Inject the adapter into a materialised `hf_model` in place (loading `spec.adapter` when set) and
    return the same HF model: base weights frozen in their dtype, adapter weights trainable in float32."""
    import peft

    if spec.adapter:
        wrapped = peft.PeftModel.from_pretrained(hf_model, spec.adapter, is_trainable=True)
    else:
        wrapped = peft.get_peft_model(hf_model, peft_config(spec))
    return _freeze_base(wrapped.base_model.model)  # the HF model itself, now holding the LoRA layers


def inject_lora(hf_model: nn.Module, spec: LoraSpec) -> nn.Module:
    """`apply_lora` for a meta-device `hf_model`: the adapter layers are created on the meta device too
    (peft's `low_cpu_mem_usage`) and hold no values - not even `spec.adapter`'s; whoever materialises the
    model fills them (`fresh_adapter` gives peft's initial values)."""
    import peft

    wrapped = peft.get_peft_model(hf_model, peft_config(spec), low_cpu_mem_usage=True)
    return _freeze_base(wrapped.base_model.model)


def _freeze_base(model: nn.Module) -> nn.Module:
    for name, param in model.named_parameters():
        if is_adapter_param(name):
            param.data = param.data.float()  # fp32 masters; FSDP casts to model.dtype for compute
            param.requires_grad_(True)
        else:
            param.requires_grad_(False)
    return model


def fresh_adapter(layer: nn.Module, init_lora_weights: bool | str, seed: int) -> dict[str, torch.Tensor]:
    """peft's initial values of one LoRA layer's adapter (A random, B zero for the default init), full size,
    float32 on the CPU, drawn under `seed`: the same on every rank and device, whatever shards `layer`.

    peft's own `reset_lora_parameters` runs on a shallow twin of `layer` whose A and B are fresh tensors,
    so the live (meta or sharded) parameters are never touched."""
    twin = copy.copy(layer)
    twin._modules = dict(layer._modules)  # the twin's A and B must not replace the live layer's
    for kind in ("lora_A", "lora_B"):
        live = getattr(layer, kind)[ADAPTER]
        fresh = nn.Linear(live.in_features, live.out_features, bias=False, device="meta")
        fresh.weight = nn.Parameter(torch.empty(live.out_features, live.in_features), requires_grad=False)
        setattr(twin, kind, nn.ModuleDict({ADAPTER: fresh}))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        twin.reset_lora_parameters(ADAPTER, init_lora_weights)
    return {kind: getattr(twin, kind)[ADAPTER].weight.data for kind in ("lora_A", "lora_B")}


def adapter_owner(module_name: str) -> tuple[str, str] | None:
    """'...q_proj.lora_A.default' -> ('...q_proj', 'lora_A'); None for a module that is not an adapter weight."""
    for kind in ("lora_A", "lora_B"):
        suffix = f".{kind}.{ADAPTER}"
        if module_name.endswith(suffix):
            return module_name[: -len(suffix)], kind
    return None


def base_module_name(module_name: str) -> str:
    """Live name of a module of the base -> its HF name ('...q_proj.base_layer' -> '...q_proj')."""
    return base_name(module_name + ".")[:-1]


def is_adapter_param(name: str) -> bool:
    return f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name


def to_peft_key(name: str) -> str:
    """Live parameter name -> the key peft writes in adapter_model.safetensors."""
    return _PEFT_PREFIX + name.replace(f".lora_A.{ADAPTER}.", ".lora_A.").replace(
        f".lora_B.{ADAPTER}.", ".lora_B."
    )


def base_name(name: str) -> str:
    """Live name of a wrapped base weight -> the HF name ('q_proj.base_layer.weight' -> 'q_proj.weight')."""
    return name.replace(".base_layer.", ".")


def lora_pair(base_key: str) -> tuple[str, str] | None:
    """The live names of (A, B) for a wrapped base weight name, or None for a weight without adapter."""
    if not base_key.endswith(".base_layer.weight"):
        return None
    module = base_key[: -len(".base_layer.weight")]
    return f"{module}.lora_A.{ADAPTER}.weight", f"{module}.lora_B.{ADAPTER}.weight"


def merged_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight update an adapter stands for: scaling * B @ A, in float32."""
    return (b.float() @ a.float()) * scaling


def write_adapter_config(spec: LoraSpec, out_dir: str | os.PathLike, base_model: str | None) -> None:
    peft_config(spec, base_model).save_pretrained(str(out_dir))
