"""DeepSpeed ZeRO-3: build the model inside `deepspeed.zero.Init` (every parameter partitioned over dp x cp
as soon as its module is constructed) and fill it one module at a time.

`ZeroInitBuild` plugs into `trainer.model_build.build_stage` in place of the meta-device build: `build` gives
the HF model with partitioned parameters (no weights initialised: `no_init_weights`), `fill` gathers one
module's parameters (`GatheredParameters(modifier_rank=0)`), lets rank 0 write the full values - read from
the safetensors checkpoint or the seeded random init, the same values as on the FSDP2 path - and DeepSpeed
re-partitions them on exit, broadcasting rank 0's values. No rank holds more than its partitions plus one
module's full tensors. ZeRO-1/2 replicate parameters by design and take the meta-device path.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from transformers import AutoModelForCausalLM

from models.attention import register as register_attention
from parallel.dims import sub_mesh
from parallel.load import WeightSource, fill_stage
from trainer.ds_config import build_ds_config
from trainer.step import StepGroups


def _no_init_weights() -> contextlib.AbstractContextManager:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


class ZeroInitBuild:
    """The ZeRO-3 build: `build(hf_config)` then, after the stage is cut and parallelised, `fill(stage, src)`."""

    def __init__(self, cfg: Any, mesh: DeviceMesh) -> None:
        from trainer.ds_engine import ZeroGroups, import_deepspeed

        self.deepspeed = import_deepspeed()
        # zero.Init reads the world from deepspeed.comm, which deepspeed.initialize would set up only later;
        # it adopts the process group that already exists.
        self.deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        groups = StepGroups.from_mesh(mesh)
        self.ds_config = build_ds_config(cfg, groups.fsdp_size)
        self.group = groups.dp_cp_group
        # The mpu gives DeepSpeed's config check the dp x cp world before deepspeed.comm is set up.
        self.mpu = ZeroGroups(self.group, sub_mesh(mesh, "tp").get_group())

    def build(self, hf_config: Any, dtype: torch.dtype) -> nn.Module:
        attn = register_attention()
        config = copy.deepcopy(hf_config)
        config._attn_implementation = attn
        with (
            self.deepspeed.zero.Init(
                data_parallel_group=self.group, config_dict_or_path=self.ds_config, mpu=self.mpu
            ),
            _no_init_weights(),
        ):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        model.tie_weights()  # no_init_weights also skips the tying of lm_head to the embedding
        return model

    def fill(self, stage: nn.Module, source: WeightSource) -> None:
        fill_stage(stage, _Gathered(source, self.deepspeed, dist.get_rank(self.group)))


class _Gathered(WeightSource):
    """Runs `inner.fill` on rank 0 with the module's parameters gathered whole; DeepSpeed broadcasts and
    re-partitions them when the context exits."""

    def __init__(self, inner: WeightSource, deepspeed: Any, rank: int) -> None:
        self.inner, self.deepspeed, self.rank = inner, deepspeed, rank

    def fill(self, module_fqn: str, module: nn.Module, params: dict[str, torch.Tensor]) -> None:
        with self.deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if self.rank == 0:
                self.inner.fill(module_fqn, module, params)

    def check(self, stage: nn.Module) -> None:
        self.inner.check(stage)

    def close(self) -> None:
        self.inner.close()
