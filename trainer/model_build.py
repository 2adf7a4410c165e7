"""Build this rank's model stage without ever holding the whole model: meta build -> stage -> parallelize ->
materialise own shards -> fill them (HF safetensors or seeded random init). Measures the load.

Seam for model converters (LoRA adapters, ...; a training kind supplies them, trainer/training_kind.py):
`wrap_hf` gets the meta-device HF model before the stage is cut from it and returns the model to train
(still on the meta device); `wrap_source` gets the weight source of the base model and returns the one
that fills the converted stage (e.g. adapter weights from their own file, base weights under HF names).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.causal_lm import CausalLMStage, split_layers
from models.families import expert_layout
from models.meta_build import build_meta_model
from models.safetensors_io import SafetensorsCheckpoint, resolve_model_dir
from parallel.load import CheckpointFill, RandomInit, WeightSource, fill_stage, materialize

log = logging.getLogger("longctx")


def _reset_host_peak() -> bool:
    """Linux: writing 5 to clear_refs resets the resident-set high-water mark (VmHWM) of this process."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def host_peak_bytes() -> int:
    """This process' peak resident memory: VmHWM (since the last reset), else getrusage's lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class LoadMeter:
    """Wall time and peak memory (device and host) of the model build, reported in the first metrics row."""

    device: torch.device
    t0: float = 0.0
    cpu0: float = 0.0

    def __enter__(self) -> LoadMeter:
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        _reset_host_peak()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats = {
            "load_time_s": time.perf_counter() - self.t0,
            "load_cpu_s": time.process_time() - self.cpu0,  # all threads: robust to a busy machine
            "load_peak_mem_gib": (
                torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
            ),
            "load_peak_host_gib": host_peak_bytes() / 2**30,
        }


def weight_source(
    path: str | None,
    hf_model: nn.Module,
    hf_config: Any,
    seed: int,
    device: torch.device,
) -> WeightSource:
    """Where the weights come from: `model.path`'s safetensors, else the seeded random init."""
    if path is None:
        return RandomInit(hf_model, seed, device)
    ckpt = SafetensorsCheckpoint(resolve_model_dir(path))
    return CheckpointFill(
        ckpt, bool(getattr(hf_config, "tie_word_embeddings", False)), expert_layout(hf_config)
    )


class MetaBuild:
    """The default build: every parameter on the meta device until `fill` materialises this rank's shards
    (`param_device`: the host under FSDP CPU offload) and fills them."""

    def __init__(self, device: torch.device, param_device: torch.device) -> None:
        self.device, self.param_device = device, param_device

    def build(self, hf_config: Any, dtype: torch.dtype) -> nn.Module:
        return build_meta_model(hf_config, dtype)

    def fill(self, stage: nn.Module, source: WeightSource) -> None:
        materialize(stage, self.device, self.param_device)
        fill_stage(stage, source)


class StageLoader:
    """The two halves of the build around the engine's parallelize: `build` gives this rank's stage without
    weights (meta device, or ZeRO-3 partitions), `fill` - called by the engine once TP / CP / AC / compile /
    FSDP are applied, before the optimizer exists - materialises and fills it. `stats` (`LoadMeter`) then
    holds the load's time and peaks, from the start of `build` to the end of `fill`.

    `builder` (default `MetaBuild`; `trainer.ds_load.ZeroInitBuild` for ZeRO-3) creates the HF model and
    fills the parallelised stage. `dtype`: fp32 masters for FSDP2 (its mixed precision casts to model.dtype
    for compute); model.dtype for DeepSpeed, which keeps its own fp32 masters, and for a frozen base (LoRA)."""

    def __init__(
        self,
        cfg: Any,
        hf_config: Any,
        device: torch.device,
        builder: Any = None,
        dtype: torch.dtype = torch.float32,
        wrap_hf: Callable[[nn.Module], nn.Module] | None = None,
        wrap_source: Callable[[WeightSource, nn.Module, int], WeightSource] | None = None,
    ) -> None:
        if builder is None:
            offload = cfg.parallel.fsdp_cpu_offload and cfg.parallel.engine == "fsdp2"
            builder = MetaBuild(device, torch.device("cpu") if offload else device)
        self.cfg, self.hf_config, self.device, self.builder, self.dtype = (
            cfg,
            hf_config,
            device,
            builder,
            dtype,
        )
        self.wrap_hf, self.wrap_source = wrap_hf, wrap_source
        self.meter = LoadMeter(device)
        self.stats: dict = {}
        self._hf: nn.Module | None = None

    def build(self, pp_rank: int, pp_size: int) -> CausalLMStage:
        cfg = self.cfg
        self.meter.__enter__()
        hf = self.builder.build(self.hf_config, self.dtype)
        if self.wrap_hf is not None:
            hf = self.wrap_hf(hf)
        first, last = split_layers(self.hf_config.num_hidden_layers, pp_size)[pp_rank]
        stage = CausalLMStage(
            hf, first, last, loss_chunk=cfg.training.loss_chunk, loss_impl=cfg.training.loss_impl
        )
        stage.doc_mask = cfg.data.doc_mask
        self._hf = hf  # the random init calls the HF model's _init_weights; other stages' layers stay meta
        return stage

    def fill(self, stage: nn.Module) -> None:
        cfg = self.cfg
        seed = cfg.training.seed
        source = weight_source(cfg.model.path, self._hf, self.hf_config, seed, self.device)
        if self.wrap_source is not None:  # (base source, the wrapped meta HF model, training.seed)
            source = self.wrap_source(source, self._hf, seed)
        self.builder.fill(stage, source)
        self._hf = None
        self.meter.__exit__(None, None, None)
        self.stats = self.meter.stats
        log.info(
            "model stage built on the meta device and filled from %s in %.1fs (peak %s, host peak %.2f GiB)",
            cfg.model.path or f"random init (seed {cfg.training.seed})",
            self.stats["load_time_s"],
            "n/a"
            if self.stats["load_peak_mem_gib"] is None
            else f"{self.stats['load_peak_mem_gib']:.2f} GiB",
            self.stats["load_peak_host_gib"],
        )


def build_stage(
    cfg: Any,
    hf_config: Any,
    parallelize: Callable[[CausalLMStage], Any],
    pp_rank: int,
    pp_size: int,
    device: torch.device,
    **loader_kwargs: Any,
) -> tuple[CausalLMStage, dict]:
    """`StageLoader` in one call: build, `parallelize(stage)` (still on the meta device), fill. Returns the
    stage and the load measurements."""
    loader = StageLoader(cfg, hf_config, device, **loader_kwargs)
    stage = loader.build(pp_rank, pp_size)
    parallelize(stage)
    loader.fill(stage)
    return stage, loader.stats
