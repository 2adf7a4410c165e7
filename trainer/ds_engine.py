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

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from models.causal_lm import CausalLMStage
from models.parallelize import parallelize_llama
from parallel.cp.sharding import shard_batch
from parallel.dims import ConfigError, ParallelDims, sub_mesh
from trainer.checkpoint import (
    MARKER,
    TRAIN_STATE,
    Checkpointer,
    CheckpointError,
    _agreed,
    _all_ok,
    _barrier,
    _first_line,
    _fresh_dir,
    _rank,
    _schedulers,
    _world,
)
from trainer.ds_config import build_ds_config
from trainer.loss import count_valid, mean_loss, skip_nonfinite
from trainer.optim import build_optimizer
from trainer.step import StepGroups

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
    return build_optimizer(params, o)


class DeepSpeedRunner:
    """The DeepSpeed engine around one CausalLMStage, with the trainer's step, checkpoint and export."""

    def __init__(
        self, cfg: Any, stage: CausalLMStage, mesh: DeviceMesh, device: torch.device, base: Checkpointer
    ) -> None:
        deepspeed = import_deepspeed()
        self.cfg = cfg
        self.stage = stage
        self.groups = StepGroups.from_mesh(mesh)
        self.ds_config = build_ds_config(cfg, self.groups.fsdp_size)
        if cfg.deepspeed.zero_stage == 3 and stage.lm_head is not None:
            # The chunked loss reads lm_head.weight directly (never calls lm_head): ZeRO-3 must gather it
            # for the stage's own forward and backward.
            deepspeed.zero.register_external_parameter(stage, stage.lm_head.weight)
        params = [p for p in stage.parameters() if p.requires_grad]
        self.optimizer = _build_optimizer(params, cfg)
        zero_groups = ZeroGroups(self.groups.dp_cp_group, sub_mesh(mesh, "tp").get_group())
        self.engine, _, _, _ = deepspeed.initialize(
            model=stage,
            optimizer=self.optimizer,
            config=self.ds_config,
            mpu=zero_groups,
            dist_init_required=False,
        )
        self.device = device
        self.checkpointer = DeepSpeedCheckpointer(self.engine, base)
        d = cfg.deepspeed
        log.info(
            "deepspeed engine: ZeRO-%d over dp x cp = %d ranks, offload optimizer=%s params=%s%s",
            d.zero_stage,
            self.groups.fsdp_size,
            d.offload_optimizer,
            d.offload_params,
            f", user config {d.config}" if d.config else "",
        )

    # ---- one optimizer step ---------------------------------------------------------------------
    def train_step(
        self, batches: list[dict[str, torch.Tensor]], step: int, skipped_so_far: int
    ) -> tuple[float, float, bool]:
        """Forward/backward every micro-batch and step; returns (loss, grad norm before clipping, skipped).

        Raises NonFiniteError when the loss or grad norm is NaN/inf and training.skip_nonfinite is used up.
        DeepSpeed has already discarded the update of such a step (fp32, ZeRO-3, bf16 check_grad_overflow).
        """
        cfg = self.cfg
        g = self.groups
        global_valid = count_valid(batches, g.dp_group, self.device)
        self.stage.loss_scale = g.fsdp_size / max(global_valid, 1)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in batches:
            b = shard_batch(batch, g.cp_size, g.cp_rank, cfg.parallel.cp_layout, self.device)
            loss = self.engine(b["input_ids"], b["position_ids"], b["doc_ids"], b["labels"]).sum()
            self.engine.backward(loss, scale_wrt_gas=False)
            self.engine.step()  # DeepSpeed only reduces and updates at the accumulation boundary
            loss_sum += loss.detach().double()
        loss_value = mean_loss(loss_sum, g.fsdp_size, g.dp_cp_group)
        norm = self.engine.get_global_grad_norm()
        grad_norm = float("nan") if norm is None else float(norm)
        # DeepSpeed has already discarded the update of a non-finite step; only the decision is ours.
        skipped = skip_nonfinite(
            loss_sum.item(),
            loss_value,
            grad_norm,
            step + 1,
            skipped_so_far,
            cfg.training.skip_nonfinite,
            self.device,
        )
        return loss_value, grad_norm, skipped

    # ---- HF export --------------------------------------------------------------------------------
    def export_hf(self, hf_config: Any, tokenizer: Any, out_dir: str | os.PathLike, dtype: str) -> Path:
        """Collective. Write the fp32 master weights (gathered one parameter at a time, whatever the ZeRO
        stage or offload) as `from_pretrained`-loadable safetensors in `dtype`; rank 0 writes."""
        from deepspeed.utils import safe_get_full_fp32_param
        from safetensors.torch import save_file

        out, dt = Path(out_dir), getattr(torch, dtype)
        state: dict[str, torch.Tensor] = {}
        for name, param in self.stage.named_parameters():  # HF names; a tied lm_head appears once
            full = safe_get_full_fp32_param(param)
            if full is None:  # frozen or not managed by the optimizer: the module holds it whole
                full = param.detach()
            if _rank() == 0:
                state[name] = full.detach().to(device="cpu", dtype=dt).contiguous().clone()

        def write() -> None:
            out.mkdir(parents=True, exist_ok=True)
            save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
            config = hf_config.__class__.from_dict(hf_config.to_dict())
            config.dtype = dt
            config.save_pretrained(out)
            if tokenizer is not None:
                tokenizer.save_pretrained(out)

        _agreed(write, f"HF export to {out} failed", rank0_only=True)
        log.info("exported HF model (%s) to %s", dtype, out)
        return out


class DeepSpeedCheckpointer(Checkpointer):
    """`Checkpointer` whose model and optimizer state go through DeepSpeed's save/load_checkpoint.

    Same directory protocol (step_<N>.tmp -> COMPLETE.json -> rename, keep-k, resume: auto) and the same
    longctx files: train_state.pt (step, scheduler) and extra_rank<R>.pt (data position, RNG, counters);
    DeepSpeed's files (mp_rank_00_model_states.pt, *_optim_states.pt) sit next to them. The marker's
    layout records engine=deepspeed so neither engine mistakes the other's checkpoint for its own.
    """

    def __init__(self, engine: Any, base: Checkpointer) -> None:
        super().__init__(base.cfg, base.output_dir, layout={**base.layout, "engine": ENGINE})
        self.model_hash = base.model_hash
        self.engine = engine

    def save(
        self, step: int, model_parts: Any, optimizer: Any, scheduler: Any, extra_state: dict | None = None
    ) -> Path:
        """Collective; model_parts/optimizer are the engine's (kept for the Checkpointer signature)."""
        final = self.root / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        _agreed(lambda: _fresh_dir(tmp), f"cannot create checkpoint dir {tmp}", rank0_only=True)

        self.write_local_state(tmp, step, scheduler, extra_state)
        ok, err = True, "failed on another rank"
        try:
            self.engine.save_checkpoint(
                str(self.root), tag=tmp.name, client_state={"longctx_step": step}, save_latest=False
            )
        except Exception as exc:  # noqa: BLE001 - reported collectively, as one line
            ok, err = False, _first_line(exc)
        if not _all_ok(ok):
            raise CheckpointError(f"saving checkpoint {tmp} failed: {err}")
        self._finalize(step, tmp)
        return final

    def load(
        self, path: str | os.PathLike, model_parts: Any, optimizer: Any, scheduler: Any
    ) -> tuple[int, dict]:
        """Collective. Load a complete deepspeed-engine checkpoint saved with the same number of ranks."""
        path = Path(path)
        try:
            marker = json.loads((path / MARKER).read_text())
            train_state = torch.load(path / TRAIN_STATE, weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {path} is corrupt or incomplete: {_first_line(exc)}") from None
        engine = (marker.get("layout") or {}).get("engine", "fsdp2")
        if engine != ENGINE:
            raise CheckpointError(
                f"checkpoint {path} was written by the {engine} engine; parallel.engine=deepspeed cannot load "
                f"it (resume with parallel.engine={engine}, or start fresh with checkpoint.resume=none)"
            )
        if marker.get("world_size") != _world():
            raise CheckpointError(
                f"checkpoint {path} holds ZeRO partitions of {marker.get('world_size')} ranks, this run has "
                f"{_world()}: the deepspeed engine resumes on the same number of ranks only "
                f"({marker.get('world_size')}); parallel.engine=fsdp2 checkpoints reshard"
            )
        if self.model_hash and marker.get("model_config_hash") not in (None, self.model_hash):
            log.warning("checkpoint %s was saved with a different model config (hash differs)", path)
        ok, err, loaded = True, "failed on another rank", None
        try:
            loaded, _ = self.engine.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if loaded is None:
                raise FileNotFoundError("DeepSpeed found no model states in it")
        except Exception as exc:  # noqa: BLE001
            ok, err = False, _first_line(exc)
        if not _all_ok(ok):
            raise CheckpointError(f"loading checkpoint {path} failed: {err}")
        for sched, sd in zip(_schedulers(scheduler), train_state["schedulers"]):
            sched.load_state_dict(sd)
        extra_file = path / f"extra_rank{_rank()}.pt"
        try:
            extra = torch.load(extra_file, weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint {path}: cannot read {extra_file.name}: {_first_line(exc)}"
            ) from None
        _barrier()
        self.saved_layout = marker
        log.info("resumed from %s (step %d, deepspeed engine)", path, marker["step"])
        return int(marker["step"]), extra
