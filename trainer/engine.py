"""The engine seam: what shards a model stage and steps it. The loop calls only this interface, so FSDP2
and DeepSpeed (trainer/ds_engine.py) differ in one registry entry, not in branches of the trainer.

An engine is built from an unsharded `CausalLMStage` and owns it from then on:
  build      parallelize/wrap the stage for the run's mesh, then make the optimizer over the parameters
             that require grad (a training kind that freezes the base, like LoRA, only marks them)
  step       forward/backward of one step's micro-batches, clip, update; a `StepResult`
  checkpoint `checkpoint_entries()`: the DCP `Stateful` entries it saves (model, optimizer); an engine
             that writes its own files (ZeRO partitions) returns none and gives `native_checkpoint`
  export     `export_hf(...)`: a `from_pretrained`-loadable directory of the trained weights
The stage arrives without weights (built on the meta device, or as ZeRO-3 partitions: trainer/model_build.py);
between the two build phases - parallelize, then the optimizer - each engine calls `EngineContext.fill`,
which materialises and fills this rank's shards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh

from models.fp8 import cache_frozen_weights
from models.registry import DTYPES
from parallel.dims import ParallelDims, fp8_all_gather, sub_mesh
from parallel.fsdp import fp8_scale_hook
from parallel.pp import Pipeline
from trainer.checkpoint import NativeCheckpoint
from trainer.checkpoint_state import ModelState, OptimizerState
from trainer.hf_export import export_hf
from trainer.optim import build_optimizer
from trainer.step import StepGroups, StepResult, fsdp2_step


@dataclass
class EngineContext:
    """What an engine needs from the run besides the config: the mesh and where to compute."""

    mesh: DeviceMesh
    dims: ParallelDims
    device: torch.device
    parallelize: Callable  # the model family's parallelize_<family>(stage, mesh, dims, cfg)
    fill: Callable[[nn.Module], None] | None = None
    """Materialise and fill a stage built without weights (trainer/model_build.py), once parallelised and
    before the optimizer is made over its parameters."""


class Engine(Protocol):
    name: str
    stage: nn.Module  # the model stage as the step runs it (forward hooks, evaluation)
    optimizer: torch.optim.Optimizer
    groups: StepGroups
    native_checkpoint: NativeCheckpoint | None

    def step(self, batches: list[dict[str, torch.Tensor]], step: int, skipped_so_far: int) -> StepResult:
        """One optimizer step; `step` is its 0-based index. Raises NonFiniteError when it must stop."""

    def checkpoint_entries(self) -> dict[str, Stateful]: ...

    def export_hf(self, hf_config: Any, tokenizer: Any, out_dir: str | os.PathLike, dtype: str) -> Path: ...

    def close(self) -> None:
        """Release what outlives the engine otherwise (hooks, pinned buffers)."""


class Fsdp2Engine:
    """FSDP2 over dp x cp (with TP, PP, HSDP, CPU offload as configured): the family's parallelize shards
    the stage, torch's AdamW steps it (trainer/step.py), DCP checkpoints it."""

    name = "fsdp2"
    native_checkpoint = None

    def __init__(self, cfg: Any, stage: nn.Module, ctx: EngineContext) -> None:
        self.cfg, self.device = cfg, ctx.device
        self.groups = StepGroups.from_mesh(ctx.mesh)
        self.stage = self._parallelize(stage, ctx)
        if ctx.fill is not None:
            ctx.fill(self.stage)
        if cfg.training.fp8:  # training.fp8_cache_frozen: frozen weights cast once, now they hold values
            cache_frozen_weights(self.stage, DTYPES[cfg.model.dtype], self.device)
        self.pipeline = self._pipeline(ctx) if ctx.dims.pp > 1 else None
        self.params = [p for p in self.stage.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim)
        if fp8_all_gather(cfg):  # training.fp8, tensorwise: all FP8 weight scales after each update
            fp8_scale_hook(self.optimizer, self.stage)

    def _parallelize(self, stage: nn.Module, ctx: EngineContext) -> nn.Module:
        ctx.parallelize(stage, ctx.mesh, ctx.dims, self.cfg)
        stage.train()
        return stage

    def _pipeline(self, ctx: EngineContext) -> Pipeline:
        cfg, dims = self.cfg, ctx.dims
        per_step = cfg.training.grad_accum * cfg.training.micro_batch_size
        micro = cfg.parallel.pp_microbatches or per_step
        local_seq = cfg.training.seq_len // dims.cp
        return Pipeline(
            self.stage,
            sub_mesh(ctx.mesh, "pp"),
            self.device,
            micro,
            cfg.parallel.pp_schedule,
            microbatch_shape=(per_step // micro, local_seq),
            hidden_size=self.stage.config.hidden_size,
            dtype=DTYPES[cfg.model.dtype],
            hidden_seq=local_seq // (dims.tp if cfg.parallel.sequence_parallel else 1),
        )

    def step(self, batches: list[dict[str, torch.Tensor]], step: int, skipped_so_far: int) -> StepResult:
        return fsdp2_step(
            self.stage,
            self.params,
            self.optimizer,
            batches,
            self.groups,
            self.cfg,
            self.device,
            step,
            skipped_so_far,
            self.pipeline,
        )

    def checkpoint_entries(self) -> dict[str, Stateful]:
        return {"model": ModelState([self.stage]), "optim": OptimizerState([self.stage], self.optimizer)}

    def export_hf(self, hf_config: Any, tokenizer: Any, out_dir: str | os.PathLike, dtype: str) -> Path:
        return export_hf([self.stage], hf_config, tokenizer, out_dir, dtype)

    def close(self) -> None:
        self.optimizer = self.params = self.pipeline = None


def _deepspeed(cfg: Any, stage: nn.Module, ctx: EngineContext) -> Engine:
    from trainer.ds_engine import DeepSpeedEngine  # imports deepspeed: only when it is the engine

    return DeepSpeedEngine(cfg, stage, ctx)


ENGINES: dict[str, Callable[[Any, nn.Module, EngineContext], Engine]] = {
    "fsdp2": Fsdp2Engine,
    "deepspeed": _deepspeed,
}


def _fsdp2_stage_build(cfg: Any, mesh: DeviceMesh) -> tuple[Any, torch.dtype]:
    return None, torch.float32  # the default meta build; fp32 masters, FSDP casts to model.dtype


def _deepspeed_stage_build(cfg: Any, mesh: DeviceMesh) -> tuple[Any, torch.dtype]:
    from trainer.ds_load import ZeroInitBuild  # DeepSpeed keeps its own fp32 masters: build in model.dtype

    return (ZeroInitBuild(cfg, mesh) if cfg.deepspeed.zero_stage == 3 else None), DTYPES[cfg.model.dtype]


# How each engine wants the model stage built before it takes it: (StageLoader builder or None, dtype).
STAGE_BUILDS: dict[str, Callable[[Any, DeviceMesh], tuple[Any, torch.dtype]]] = {
    "fsdp2": _fsdp2_stage_build,
    "deepspeed": _deepspeed_stage_build,
}


def stage_build(cfg: Any, mesh: DeviceMesh, engine: str | None = None) -> tuple[Any, torch.dtype]:
    """The builder and parameter dtype for the stage `engine` (default `parallel.engine`) will own."""
    return STAGE_BUILDS[engine or cfg.parallel.engine](cfg, mesh)


def build_engine(cfg: Any, stage: nn.Module, ctx: EngineContext) -> Engine:
    """The engine `parallel.engine` names, built around `stage` (config validation checked the name)."""
    return ENGINES[cfg.parallel.engine](cfg, stage, ctx)
