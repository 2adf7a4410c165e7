"""Build an HF causal LM without storage (meta device) and describe how to fill it, one module at a time.

Single-device code: nothing here knows about shards. `parallel/load.py` asks these functions for the *full*
value of one module's parameters (a random init or the slice of a safetensors file) and keeps only the
part its rank owns, so no rank ever holds more than its shards plus one module's full tensors.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from models.attention import register as register_attention

# Wrapper names that torch inserts into parameter paths (compile, checkpoint_wrapper, FSDP1); the HF
# checkpoint and `CausalLMStage` use the plain names.
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def clean_fqn(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def build_meta_model(hf_config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The `*ForCausalLM` of `hf_config` with every parameter and buffer on the meta device (no storage,
    no init), longctx attention selected. Shapes and dtypes are final; values come later."""
    attn = register_attention()
    config = copy.deepcopy(hf_config)
    config._attn_implementation = attn
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model


def init_seed(seed: int, module_fqn: str) -> int:
    """One seed per (training.seed, module name): a module's init is independent of which rank, stage or
    order initialises it - the property that makes random init identical for every layout."""
    return zlib.crc32(f"{seed}:{clean_fqn(module_fqn)}".encode()) & 0x7FFFFFFF


def full_init(
    hf_model: nn.Module,
    module: nn.Module,
    module_fqn: str,
    shapes: dict[str, torch.Size],
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> dict[str, torch.Tensor]:
    """The full (unsharded) initial values of `module`'s own parameters, from the family's `_init_weights`.

    `module` may be sharded (DTensor / FSDP parameters) or replaced by a lean twin: a shallow copy of it gets
    fresh full-size tensors of `shapes` (global shapes) and the HF model's own `_init_weights` fills them,
    under a seed derived from `module_fqn` on `device`'s generator."""
    twin = copy.copy(module)
    # Every parameter slot of the module (None stays None: a Linear without bias); those not asked for get
    # throwaway tensors, so the init never writes into the module's real storage.
    twin._parameters = {
        name: None
        if p is None
        else nn.Parameter(
            torch.empty(shapes.get(name, p.shape), dtype=dtype, device=device), requires_grad=False
        )
        for name, p in module._parameters.items()
    }
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(init_seed(seed, module_fqn))
        hf_model._init_weights(twin)
    return {name: twin._parameters[name].data for name in shapes}


def nonpersistent_buffer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules holding buffers that checkpoints never contain (the rotary `inv_freq`): after `to_empty` they
    are garbage and must be recomputed."""
    for name, module in model.named_modules():
        if module._non_persistent_buffers_set:
            yield name, module


def recompute_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute every non-persistent buffer by running the owning module's constructor again on the CPU
    (cheap: rotary frequencies are a few KB) and copying its buffers to `device`. The module's own config
    is reused, so RoPE scaling types and overrides carry over."""
    for name, module in nonpersistent_buffer_modules(model):
        config = getattr(module, "config", None)
        if config is None:
            raise ValueError(
                f"model: module {name or '<root>'} ({type(module).__name__}) has non-persistent buffers "
                f"{sorted(module._non_persistent_buffers_set)} that longctx cannot recompute after a meta build"
            )
        with torch.device("cpu"):
            fresh = type(module)(config=config)
        for buf in module._non_persistent_buffers_set:
            module._buffers[buf] = fresh._buffers[buf].to(device)
        for attr, value in vars(fresh).items():  # e.g. attention_scaling, computed with inv_freq
            if not attr.startswith("_") and isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(module, attr, value)


def checkpoint_key_candidates(fqn: str, tied: bool) -> list[str]:
    """HF checkpoint names that may hold parameter `fqn` of a `*ForCausalLM`, most likely first:
    the name itself, without the `model.` prefix (checkpoints of the bare decoder), with a `model.`
    prefix, and the input embedding for a tied `lm_head`."""
    name = clean_fqn(fqn)
    out = [name]
    if name.startswith("model."):
        out.append(name[len("model.") :])
    else:
        out.append("model." + name)
    if tied and name == "lm_head.weight":
        out += ["model.embed_tokens.weight", "embed_tokens.weight"]
    return out
