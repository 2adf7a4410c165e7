"""Materialise a parallelised meta-device stage and fill each rank's own shards.

After TP / CP / AC / compile / FSDP2 have been applied to a stage built on the meta device, every parameter
is a (DTensor) shape without storage. `materialize` allocates this rank's shards (`to_empty`) and recomputes
the non-persistent buffers; `fill_stage` then visits the stage module by module and writes, into each local
shard, the block of the global tensor it covers (`DTensor.__create_chunk_list__`, the offsets DCP uses),
taken from a `WeightSource`: an HF safetensors checkpoint (each rank reads only its own blocks from disk)
or the family's random init (the full tensors of one module at a time, seeded by the module's name, so
every layout gets the same weights). No collective is needed: every rank reads or computes what it owns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from models.expert_layout import FusedExperts, expert_keys, expert_requests, match, part_key, part_shape
from models.meta_build import checkpoint_key_candidates, clean_fqn, full_init, recompute_buffers
from models.safetensors_io import SafetensorsCheckpoint


def materialize(stage: nn.Module, device: torch.device, param_device: torch.device | None = None) -> None:
    """Allocate (uninitialised) storage for this rank's shards on `param_device` (the host with FSDP CPU
    offload, else `device`), buffers on `device`, and recompute the non-persistent buffers."""
    param_device = param_device or device
    stage.to_empty(device=param_device)
    if param_device != device:
        for module in stage.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(device)
    recompute_buffers(stage, device)


def local_block(param: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
    """(global offsets, writable local tensor) of the part of `param` this rank stores."""
    if isinstance(param, DTensor):
        chunks = param.__create_chunk_list__()
        if len(chunks) != 1:
            raise NotImplementedError(f"a parameter stored as {len(chunks)} blocks on one rank")
        local = param.to_local()
        if tuple(local.shape) != tuple(chunks[0].sizes):
            raise AssertionError(f"local shard {tuple(local.shape)} != its chunk {tuple(chunks[0].sizes)}")
        return tuple(chunks[0].offsets), local
    return (0,) * param.dim(), param.data


def global_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's full shape (a ZeRO-3 partition's own `shape` is empty)."""
    return tuple(getattr(param, "ds_shape", param.shape))


class WeightSource:
    """Where a stage's weights come from. `fill_stage` calls `check` once before anything is read, then
    `fill_all` with every module that owns parameters, then `close`. A source implements `fill`; the
    others default to: check = nothing `missing`, fill_all = `fill` module by module, close = nothing."""

    def missing(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        """The names of what this source lacks for the parameters `shapes` (name -> global shape)."""
        return []

    def check(self, stage: nn.Module) -> None:
        """Every rank, before reading: raises ValueError naming the first few parameters the source lacks."""
        report_missing(self.missing({n: global_shape(p) for n, p in stage.named_parameters()}))

    def fill(self, module_fqn: str, module: nn.Module, params: dict[str, torch.Tensor]) -> None:
        """Write the values of `params` (this module's own, by local name) into their local shards."""
        raise NotImplementedError

    def fill_all(self, modules: list[tuple[str, nn.Module, dict[str, torch.Tensor]]]) -> None:
        for module_fqn, module, params in modules:
            self.fill(module_fqn, module, params)

    def close(self) -> None:
        pass


class RandomInit(WeightSource):
    """The family's `_init_weights`, one module's full tensors at a time on `device`, seeded per module."""

    def __init__(self, hf_model: nn.Module, seed: int, device: torch.device):
        self.hf_model, self.seed, self.device = hf_model, seed, device

    def fill(self, module_fqn: str, module: nn.Module, params: dict[str, torch.Tensor]) -> None:
        # fp32 whatever the parameters' dtype: the same values for fp32 masters and bf16 replicas
        full = full_init(
            self.hf_model,
            module,
            module_fqn,
            {n: p.shape for n, p in params.items()},
            torch.float32,
            self.device,
            self.seed,
        )
        for name, param in params.items():
            offsets, local = local_block(param)
            block = tuple(slice(o, o + s) for o, s in zip(offsets, local.shape))
            local.copy_(full[name][block])
        del full


class CheckpointFill(WeightSource):
    """Blocks read from an HF safetensors checkpoint; `check` reports every parameter it lacks before
    anything is read. `experts` (the family's, models/expert_layout.py): fused expert parameters that a
    checkpoint may store per expert; each rank then reads the rows of the expert tensors its block covers."""

    def __init__(self, ckpt: SafetensorsCheckpoint, tied: bool, experts: tuple[FusedExperts, ...] = ()):
        self.ckpt, self.tied, self.experts = ckpt, tied, experts

    def key_of(self, fqn: str) -> str | None:
        return next((k for k in checkpoint_key_candidates(fqn, self.tied) if k in self.ckpt), None)

    def per_expert(self, fqn: str) -> tuple[str, FusedExperts] | None:
        """(checkpoint prefix, spec) when `fqn` is a fused expert parameter that the checkpoint does not hold
        by its own name: the prefix under which expert 0's first part is saved (else the first candidate's)."""
        if not self.experts or self.key_of(fqn) is not None:
            return None
        found = [m for k in checkpoint_key_candidates(fqn, self.tied) if (m := match(k, self.experts))]
        for prefix, spec in found:
            if part_key(prefix, 0, spec.parts[0]) in self.ckpt:
                return prefix, spec
        return found[0] if found else None

    def missing(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        """The checkpoint tensors that the parameters `shapes` (name -> global shape) need and that the
        checkpoint lacks: a parameter's name, or one expert's tensor of a fused expert parameter."""
        out = []
        for name, shape in shapes.items():
            experts = self.per_expert(name)
            if experts is not None:
                prefix, spec = experts
                out += [k for k in expert_keys(prefix, spec, shape[0]) if k not in self.ckpt]
            elif self.key_of(name) is None:
                out.append(clean_fqn(name))
        return out

    def fill(self, module_fqn: str, module: nn.Module, params: dict[str, torch.Tensor]) -> None:
        self.fill_all([(module_fqn, module, params)])

    def fill_all(self, modules: list[tuple[str, nn.Module, dict[str, torch.Tensor]]]) -> None:
        """`fill` for many modules with one batched read: every block of every module, in file order."""
        requests = []
        for module_fqn, _, params in modules:
            for name, param in params.items():
                fqn = f"{module_fqn}.{name}" if module_fqn else name
                offsets, local = local_block(param)
                experts = self.per_expert(fqn)
                if experts is None:
                    key = self.key_of(fqn)
                    self._check_shape(key, tuple(param.shape))
                    requests.append((key, offsets, local))
                    continue
                prefix, spec = experts
                want = part_shape(spec, tuple(param.shape))
                for key in expert_keys(prefix, spec, param.shape[0]):
                    self._check_shape(key, want)
                requests += expert_requests(prefix, spec, tuple(param.shape), offsets, local)
        self.ckpt.read_many(requests)

    def _check_shape(self, key: str, want: tuple[int, ...]) -> None:
        saved = tuple(self.ckpt.entries[key].shape)
        if saved != tuple(want):
            raise ValueError(f"checkpoint tensor {key} has shape {saved}, the model expects {tuple(want)}")

    def close(self) -> None:
        self.ckpt.close()


def report_missing(missing: list[str], what: str = "the checkpoint") -> None:
    """One line naming the first few parameters `what` lacks (raises ValueError), if any."""
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise ValueError(f"{what} has no tensor for {', '.join(missing[:4])}{more}")


def fill_stage(stage: nn.Module, source: WeightSource) -> None:
    """Visit every module that owns parameters (a tied parameter once, under its first name) and let
    `source` fill them, all in one `fill_all` (a checkpoint's: one batched read). Persistent buffers are
    not supported (Llama-family models have none)."""
    source.check(stage)
    seen: set[int] = set()
    modules = []
    for module_fqn, module in stage.named_modules():
        persistent = set(module._buffers) - module._non_persistent_buffers_set
        if any(module._buffers[b] is not None for b in persistent):
            raise NotImplementedError(f"{module_fqn}: persistent buffers {sorted(persistent)}")
        params = {n: p for n, p in module._parameters.items() if p is not None and id(p) not in seen}
        if params:
            seen.update(id(p) for p in params.values())
            modules.append((module_fqn, module, params))
    with torch.no_grad():
        try:
            source.fill_all(modules)
        finally:
            source.close()
