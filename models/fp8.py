"""FP8 training of the decoder's projections with torchao's float8 (`training.fp8`).

Each decoder layer's q/k/v/o and gate/up/down `nn.Linear` becomes a torchao `Float8Linear`: its three
matmuls (output, grad input, grad weight) run on FP8 tensor cores with dynamic scales - one scale per
tensor (`tensorwise`) or per row (`rowwise`; `rowwise_with_gw_hp` keeps the weight gradient's GEMM in
bf16), computed from the current values every step. The embedding, the final norm and the LM head stay in
bf16 (the LM head's logits feed the loss directly, and its vocabulary dimension is where FP8 error hurts
the loss most), and so may the first and last decoder layers (training.fp8_bf16_layers). With peft LoRA
the frozen base layer (`base_layer`) computes in FP8 and the adapters (`lora_A`, `lora_B`) stay in bf16:
their rank is tiny and they train.

A frozen base that each rank holds whole (one GPU) is cast to FP8 once instead of in every matmul
(training.fp8_cache_frozen: models/fp8_frozen.py, `cache_frozen_weights` after loading).

Single-device code: which modules convert and with which torchao config. FSDP2's FP8 all-gather needs a
scale hook after the optimizer step (parallel/fsdp.py `fp8_scale_hook`).
"""

from __future__ import annotations

from torch import nn

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
INSTALL_HINT = "needs torchao (pip install -e .[fp8])"


def torchao_missing() -> str | None:
    """Why torchao's float8 training cannot be imported here, or None when it can. (Its import-time
    noise on a CPU build of torch is dropped by models/torchao_import_logs.py, installed with `models`.)"""
    try:
        import torchao.float8  # noqa: F401
    except ImportError as exc:
        return f"{INSTALL_HINT}: {' '.join(str(exc).split())}"
    return None


def device_problem(device) -> str | None:
    """Why `device` cannot run FP8 matmuls, or None: FP8 tensor cores start at compute capability 8.9
    (Ada); Hopper (9.0) and later are what longctx measures."""
    import torch

    if device.type != "cuda":
        return f"needs a CUDA GPU with FP8 tensor cores (Hopper or later); this run is on {device.type}"
    if not torch.cuda.is_available():
        return None  # checked where the run starts: this process sees no GPU (a --dry-run elsewhere)
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"needs FP8 tensor cores (Hopper, sm90 or later); {name} is sm{major}{minor}"
    return None


def is_projection(module: nn.Module, fqn: str) -> bool:
    """torchao's `module_filter_fn`: True for a decoder projection (or the frozen base of a LoRA-wrapped
    one) whose both dimensions are multiples of 16 (FP8 GEMMs require it). `fqn` is relative to the layer."""
    if not isinstance(module, nn.Linear):
        return False
    parts = fqn.split(".")
    if any(p.startswith("lora_") for p in parts):  # peft adapters: lora_A.<name>, lora_B.<name>
        return False
    name = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]
    if name not in PROJECTIONS:
        return False
    out_features, in_features = module.weight.shape
    return out_features % 16 == 0 and in_features % 16 == 0


def fp8_layers(stage: nn.Module, bf16_layers: int) -> list[nn.Module]:
    """The decoder layers of a CausalLMStage that compute in FP8: all but the model's first and last
    `bf16_layers` (training.fp8_bf16_layers). The stage's layer keys are the model's indices, under PP too."""
    last = stage.config.num_hidden_layers - bf16_layers
    return [layer for key, layer in stage.model.layers.items() if bf16_layers <= int(key) < last]


def float8_config(recipe: str, fsdp_all_gather: bool):
    """torchao's Float8LinearConfig for `recipe`. FP8 all-gather exists for tensorwise scaling only (a
    rowwise scale needs the whole row, which a shard does not hold). rowwise_with_gw_hp is torchao's
    rowwise with the weight gradient's GEMM left in bf16 (its most accurate recipe)."""
    from torchao.float8 import Float8LinearConfig

    if recipe not in RECIPES:
        raise ValueError(f"training.fp8_recipe: must be one of {' | '.join(RECIPES)}, got {recipe!r}")
    if recipe == "tensorwise":
        return Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp_all_gather)
    return Float8LinearConfig.from_recipe_name(recipe)


def convert_projections(
    layers: list[nn.Module], recipe: str, fsdp_all_gather: bool = False, cache_frozen: bool = False
) -> list[str]:
    """Swap the projections of each decoder layer for torchao Float8Linear in place; returns the converted
    names (relative to their layer, e.g. `self_attn.q_proj`). Call before TP shards the layers: TP's
    input/output hooks live on the module instance, which the swap replaces. `cache_frozen`: a projection
    whose weight does not train becomes a FrozenFloat8Linear (models/fp8_frozen.py), which casts its weight
    once when `cache_frozen_weights` runs - only for weights no rank shares (no TP, no FSDP sharding)."""
    from torchao.float8 import convert_to_float8_training

    config = float8_config(recipe, fsdp_all_gather)
    frozen_config = float8_config(recipe, fsdp_all_gather=False)  # the cache replaces the FP8 all-gather
    if cache_frozen:
        from models.fp8_frozen import FrozenFloat8Linear, cacheable

        cache_frozen = cacheable(frozen_config)
    converted: list[str] = []
    for layer in layers:
        frozen: list[str] = []

        def keep(module: nn.Module, fqn: str, converted=converted, frozen=frozen) -> bool:
            if not is_projection(module, fqn):
                return False
            converted.append(fqn)
            if cache_frozen and not module.weight.requires_grad:
                frozen.append(fqn)
                return False  # swapped below, as its own class
            return True

        convert_to_float8_training(layer, module_filter_fn=keep, config=config)
        for fqn in frozen:
            parent, _, leaf = fqn.rpartition(".")
            owner = layer.get_submodule(parent)
            setattr(owner, leaf, FrozenFloat8Linear.from_float(getattr(owner, leaf), config=frozen_config))
    return converted


def cache_frozen_weights(model: nn.Module, dtype, device) -> int:
    """Cast every FrozenFloat8Linear's weight to FP8 once (call after the weights hold their values);
    returns how many. `dtype`, `device`: where and from which dtype the forward would cast them."""
    from models.fp8_frozen import FrozenFloat8Linear

    modules = [m for m in model.modules() if isinstance(m, FrozenFloat8Linear)]
    for m in modules:
        m.cache_weight(dtype, device)
    return len(modules)
