"""DeepSpeed ZeRO-1/2/3 (+ CPU offload) as the data-parallel engine in place of FSDP2, for dp x cp layouts.

The stage gets CP attention exactly as on the FSDP2 path, then `deepspeed.initialize` wraps it with a
data-parallel group of dp x cp ranks (the mesh's flattened "dp_cp" dimension): CP ranks hold the same
weights, so ZeRO partitions over them like over extra dp ranks. Scaling is the FSDP2 path's: each rank
back-propagates (token-loss sum) * dp_cp / (global valid tokens) and DeepSpeed averages gradients over the
dp_cp ranks, which yields the exact global-batch mean. The trainer already normalises over all gradient
accumulation micro-batches, so backward runs with `scale_wrt_gas=False`. Clipping, the grad norm (before
clipping) and the skip of non-finite steps happen inside DeepSpeed's step; the LambdaLR schedule stays
longctx's. Checkpoints use DeepSpeed's own files inside longctx's atomic `step_<N>` directories.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh

from models.causal_lm import CausalLMStage
from models.parallelize import parallelize_llama
from parallel.cp.sharding import shard_batch
from parallel.dims import ConfigError, ParallelDims, sub_mesh
from trainer.checkpoint import CheckpointError, _agreed, _world
from trainer.ds_config import build_ds_config
from trainer.loss import agree_step, count_valid, loss_scale, skip_nonfinite
from trainer.optim import build_optimizer
from trainer.step import StepGroups, StepResult

if TYPE_CHECKING:
    from trainer.engine import EngineContext

log = logging.getLogger("longctx")
ENGINE = "deepspeed"


def import_deepspeed() -> Any:
    """deepspeed, quietened (longctx logs its own metrics); ConfigError naming the key if not installed."""
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(
            "parallel.engine",
            f"deepspeed is not importable ({exc}); install it with `pip install -e .[deepspeed]` "
            "or use parallel.engine=fsdp2",
        ) from None
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    return deepspeed


class ZeroGroups:
    """The model-parallel unit (`mpu`) handed to DeepSpeed: data parallel = dp x cp, no model parallelism.

    DeepSpeed partitions ZeRO state, reduces gradients and averages them over `get_data_parallel_group()`;
    the model-parallel queries answer with the mesh's size-1 tp group.
    """

    def __init__(self, dp_cp_group: dist.ProcessGroup, single_group: dist.ProcessGroup) -> None:
        self._dp = dp_cp_group
        self._single = single_group

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._dp

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._dp)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._dp)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._dp)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._single

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


def check_layout(dims: ParallelDims) -> None:
    """The deepspeed engine runs dp x cp meshes only (config validation says so first; this guards the API)."""
    if dims.tp > 1 or dims.pp > 1 or dims.dp_replicate > 1:
        raise ConfigError(
            "parallel.engine",
            f"deepspeed supports dp x cp layouts only (got tp={dims.tp}, pp={dims.pp}, "
            f"dp_replicate={dims.dp_replicate}); use parallel.engine=fsdp2 for TP, PP and HSDP",
        )


def parallelize_for_deepspeed(
    stage: CausalLMStage, mesh: DeviceMesh, dims: ParallelDims, cfg: Any
) -> CausalLMStage:
    """Everything `parallelize_llama` applies except FSDP (it skips FSDP for this engine); DeepSpeed wraps
    the stage afterwards."""
    check_layout(dims)
    return parallelize_llama(stage, mesh, dims, cfg)


def _build_optimizer(params: list[torch.nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    d, o = cfg.deepspeed, cfg.optim
    if d.offload_optimizer == "cpu" and d.cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        log.info("deepspeed: DeepSpeedCPUAdam for the offloaded optimizer (JIT-built on first use)")
        return DeepSpeedCPUAdam(
            params,
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            weight_decay=o.weight_decay,
            adamw_mode=True,
        )
    return build_optimizer(params, o, allow_fused=False)


class DeepSpeedEngine:
    """The `Engine` (trainer/engine.py) of parallel.engine=deepspeed: one CausalLMStage inside a DeepSpeed
    engine, with the trainer's step, checkpoint and export."""

    name = ENGINE

    def __init__(self, cfg: Any, stage: CausalLMStage, ctx: EngineContext) -> None:
        deepspeed = import_deepspeed()
        self.cfg = cfg
        self.device = ctx.device
        parallelize_for_deepspeed(stage, ctx.mesh, ctx.dims, cfg)
        stage.train()
        if ctx.fill is not None:
            ctx.fill(stage)
        self.stage = stage
        self.groups = StepGroups.from_mesh(ctx.mesh)
        self.ds_config = build_ds_config(cfg, self.groups.fsdp_size)
        if cfg.deepspeed.zero_stage == 3 and stage.lm_head is not None:
            # The chunked loss reads lm_head.weight directly (never calls lm_head): ZeRO-3 must gather it
            # for the stage's own forward and backward.
            deepspeed.zero.register_external_parameter(stage, stage.lm_head.weight)
        params = [p for p in stage.parameters() if p.requires_grad]
        self.optimizer = _build_optimizer(params, cfg)
        zero_groups = ZeroGroups(self.groups.dp_cp_group, sub_mesh(ctx.mesh, "tp").get_group())
        self.engine, _, _, _ = deepspeed.initialize(
            model=stage,
            optimizer=self.optimizer,
            config=self.ds_config,
            mpu=zero_groups,
            dist_init_required=False,
        )
        self.native_checkpoint = ZeroCheckpoint(self.engine)
        d = cfg.deepspeed
        log.info(
            "deepspeed engine: ZeRO-%d over dp x cp = %d ranks, offload optimizer=%s params=%s%s",
            d.zero_stage,
            self.groups.fsdp_size,
            d.offload_optimizer,
            d.offload_params,
            f", user config {d.config}" if d.config else "",
        )

    def checkpoint_entries(self) -> dict[str, Stateful]:
        return {}  # model and optimizer are in DeepSpeed's own files (ZeroCheckpoint)

    def close(self) -> None:
        # ZeRO-3 leaves forward/backward hooks on the modules and pinned buffers: destroy() removes them.
        self.engine.destroy()

    # ---- one optimizer step ---------------------------------------------------------------------
    def step(self, batches: list[dict[str, torch.Tensor]], step: int, skipped_so_far: int) -> StepResult:
        """Forward/backward every micro-batch and step.

        Raises NonFiniteError when the loss or grad norm is NaN/inf and training.skip_nonfinite is used up.
        DeepSpeed has already discarded the update of such a step (fp32, ZeRO-3, bf16 check_grad_overflow).
        """
        cfg = self.cfg
        g = self.groups
        self.stage.loss_scale = loss_scale(count_valid(batches, g.dp_group, self.device), g.fsdp_size)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in batches:
            b = shard_batch(batch, g.cp_size, g.cp_rank, cfg.parallel.cp_layout, self.device)
            loss = self.engine(b["input_ids"], b["position_ids"], b["doc_ids"], b["labels"]).sum()
            self.engine.backward(loss, scale_wrt_gas=False)
            self.engine.step()  # DeepSpeed only reduces and updates at the accumulation boundary
            loss_sum += loss.detach().double()
        norm = self.engine.get_global_grad_norm()
        values = agree_step(loss_sum, float("nan") if norm is None else norm, g.fsdp_size, g.counts_loss)
        # DeepSpeed has already discarded the update of a non-finite step; only the decision is ours.
        skipped = skip_nonfinite(values, step + 1, skipped_so_far, cfg.training.skip_nonfinite)
        return StepResult(values.loss, values.grad_norm, skipped)

    # ---- HF export --------------------------------------------------------------------------------
    def export_hf(self, hf_config: Any, tokenizer: Any, out_dir: str | os.PathLike, dtype: str) -> Path:
        """Collective. Write the fp32 master weights (gathered one parameter at a time, whatever the ZeRO
        stage or offload) as `from_pretrained`-loadable sharded safetensors in `dtype`, streamed tensor by
        tensor (trainer/hf_export.py)."""
        from deepspeed.utils import safe_get_full_fp32_param

        from trainer.hf_export import save_config_and_tokenizer, write_streamed

        out, dt = Path(out_dir), getattr(torch, dtype)
        params = dict(self.stage.named_parameters())  # HF names; a tied lm_head appears once

        def full(param: torch.nn.Parameter):
            def gather() -> torch.Tensor:
                value = safe_get_full_fp32_param(param)  # None: frozen, the module holds it whole
                return (param.detach() if value is None else value).to(dt)

            return gather

        shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in params.items()}
        _agreed(
            lambda: out.mkdir(parents=True, exist_ok=True),
            f"cannot create HF export dir {out}",
            rank0_only=True,
        )
        write_streamed(out, list(params), shapes.__getitem__, ((n, full(p)) for n, p in params.items()), dt)
        _agreed(
            lambda: save_config_and_tokenizer(out, hf_config, tokenizer, dt),
            f"HF export to {out} failed",
            rank0_only=True,
        )
        log.info("exported HF model (%s) to %s", dtype, out)
        return out


class ZeroCheckpoint:
    """Model and optimizer state through DeepSpeed's save/load_checkpoint, as the `NativeCheckpoint` of
    longctx's step_<N> directories: DeepSpeed's files (mp_rank_00_model_states.pt, *_optim_states.pt) sit
    next to the DCP save of the step, scheduler, data position and RNG. ZeRO partitions do not reshard, so
    only a checkpoint of the same world size loads."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def check(self, path: Path, marker: dict) -> None:
        if marker.get("world_size") != _world():
            raise CheckpointError(
                f"checkpoint {path} holds ZeRO partitions of {marker.get('world_size')} ranks, this run has "
                f"{_world()}: the deepspeed engine resumes on the same number of ranks only "
                f"({marker.get('world_size')}); parallel.engine=fsdp2 checkpoints reshard"
            )

    def save(self, tmp: Path) -> None:
        self.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)

    def load(self, path: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise FileNotFoundError("DeepSpeed found no model states in it")
