"""LoRA on the meta-device build (trainer/model_build.py): peft wraps the meta HF model, the stage is cut
and parallelised, then each rank fills only its own shards - the frozen base from model.path's safetensors
slices (or the seeded random init) under the base weights' HF names, the adapter from lora.adapter's
safetensors or, for a new adapter, peft's own init drawn under a seed per layer name (so A is the same at
every world size and layout, B is zero). No rank ever holds the whole model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models import lora
from models.meta_build import clean_fqn, init_seed
from models.safetensors_io import SafetensorsCheckpoint
from parallel.load import WeightSource, global_shape, local_block, report_missing


class LoraFill(WeightSource):
    """The `WeightSource` of a LoRA stage: adapter weights from the adapter file or peft's init, every other
    parameter from `base` (the base model's source) under its HF name (`q_proj.base_layer` -> `q_proj`)."""

    def __init__(self, base: WeightSource, hf_model: nn.Module, spec: lora.LoraSpec, seed: int):
        self.base, self.hf_model, self.seed = base, hf_model, seed
        self.adapter_dir = spec.adapter
        self.adapter = SafetensorsCheckpoint(spec.adapter) if spec.adapter else None
        self.init_lora_weights = lora.peft_config(spec).init_lora_weights

    def check(self, stage: nn.Module) -> None:
        """Before anything is read: the base checkpoint holds every base weight, the adapter file every
        adapter weight of this stage (raises ValueError naming the first few missing)."""
        shapes = {clean_fqn(n): global_shape(p) for n, p in stage.named_parameters()}
        report_missing(
            self.base.missing(
                {lora.base_name(n): s for n, s in shapes.items() if not lora.is_adapter_param(n)}
            )
        )
        if self.adapter is not None:
            lacking = [
                n for n in shapes if lora.is_adapter_param(n) and lora.to_peft_key(n) not in self.adapter
            ]
            report_missing(lacking, f"the adapter {self.adapter_dir}")

    def fill(self, module_fqn: str, module: nn.Module, params: dict[str, torch.Tensor]) -> None:
        name = clean_fqn(module_fqn)
        owner = lora.adapter_owner(name)
        if owner is None:
            self.base.fill(lora.base_module_name(name), module, params)
            return
        layer, kind = owner
        if self.adapter is not None:
            self.adapter.read_many(self._adapter_reads(name, params))
            return
        # Seeded by A's own name: the base weight's seed (its layer's name) would draw A from the same stream.
        seed = init_seed(self.seed, f"{layer}.lora_A.{lora.ADAPTER}")
        full = lora.fresh_adapter(self.hf_model.get_submodule(layer), self.init_lora_weights, seed)[kind]
        for param in params.values():  # the Linear's one weight
            offsets, local = local_block(param)
            local.copy_(full[tuple(slice(o, o + s) for o, s in zip(offsets, local.shape))])

    def _adapter_reads(self, name: str, params: dict[str, torch.Tensor]) -> list:
        """(key, offsets, local block) of each parameter of adapter module `name` in the adapter file."""
        reads = []
        for pname, param in params.items():
            offsets, local = local_block(param)
            reads.append((lora.to_peft_key(f"{name}.{pname}"), offsets, local))
        return reads

    def fill_all(self, modules: list[tuple[str, nn.Module, dict[str, torch.Tensor]]]) -> None:
        """`fill` for every module: the base weights in one batched read when the base source can
        (parallel/load.CheckpointFill.fill_all), an adapter file's tensors in another; a new adapter's
        initial values module by module."""
        base, adapter_reads = [], []
        for module_fqn, module, params in modules:
            name = clean_fqn(module_fqn)
            if lora.adapter_owner(name) is None:
                base.append((lora.base_module_name(name), module, params))
            elif self.adapter is not None:
                adapter_reads += self._adapter_reads(name, params)
            else:
                self.fill(module_fqn, module, params)
        if adapter_reads:
            self.adapter.read_many(adapter_reads)
        self.base.fill_all(base)

    def close(self) -> None:
        self.base.close()
        if self.adapter is not None:
            self.adapter.close()


def lora_stage_options(spec: lora.LoraSpec, base_dtype: torch.dtype) -> dict[str, Any]:
    """`StageLoader` keyword arguments of a LoRA run: the base built (and kept) in model.dtype, peft's
    adapter layers injected on the meta device, and the fill above."""
    return {
        "dtype": base_dtype,
        "wrap_hf": lambda hf: lora.inject_lora(hf, spec),
        "wrap_source": lambda base, hf, seed: LoraFill(base, hf, spec, seed),
    }
