"""FP8 against the same model without FP8, through the trainer's FSDP2 engine: one rank function that
runs on CPU (gloo, tests/test_fp8.py) and on GPUs (NCCL, tests/test_gpu_fp8.py), and the checks on its
result.

Every case builds the same model (same seed) and trains 3 AdamW steps on the same random tokens; the first
step's gradients (before the update; clipping off) and every step's loss are compared with the case
without FP8. FP8 all-gather ("fp8"): FSDP2 casts each weight shard to FP8 before gathering it, with the
scales computed after each optimizer step; with one rank FSDP2 skips the collective but still runs that cast
and the FP8 weight it gives back, so one GPU (or one gloo rank, which cannot all-gather FP8 bytes) checks it.
"""

from __future__ import annotations

import torch

MODEL = dict(
    model_type="llama",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
PROJECTIONS = 7 * MODEL["num_hidden_layers"]
STEPS = 3


def cases(all_gather: bool) -> list[tuple[str, dict]]:
    """The FP8 variants against "no-fp8" (the same run without FP8; float32 weights on CPU). `all_gather`:
    include FP8 all-gather, which gloo can do only on one rank."""
    fp8 = {"training.fp8": True}
    out = [
        ("no-fp8", {}),
        ("fp8-local-cast", {**fp8, "training.fp8_all_gather": False}),
        ("fp8-rowwise", {**fp8, "training.fp8_recipe": "rowwise"}),
    ]
    if all_gather:
        out.append(("fp8", {**fp8, "training.fp8_all_gather": True}))
    return out


def train_cases(rank: int, world: int, device: str, dtype: str, run: list[tuple[str, dict]]) -> dict:
    """Rank function (a process group of `world` ranks is up): for each case its losses, the first step's
    full gradients (float32, on CPU), and how many Float8Linear modules and FP8-cast weights it has."""
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    from bench.common import random_batches
    from bench.train import EngineRow
    from parallel.dims import ParallelDims
    from trainer.config import build_config

    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    out = {}
    for name, overrides in run:
        raw = {
            "model": {"config": dict(MODEL), "dtype": dtype},
            "training": {"seq_len": 128, "steps": STEPS, "max_grad_norm": 0.0, "device": device},
            "data": {"doc_mask": False},
        }
        cfg = build_config(raw, overrides)
        dims = ParallelDims.from_config(cfg.parallel, world)
        row = EngineRow(cfg, dims.build_mesh(dev.type), dims, dev)
        stage = row.engine.stage
        names = {id(p): n for n, p in stage.named_parameters()}
        grads: dict[str, torch.Tensor] = {}

        def keep_first_grads(opt, args, kwargs, grads=grads, names=names):
            if grads:
                return
            for group in opt.param_groups:
                for p in group["params"]:
                    g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    grads[names[id(p)]] = g.float().cpu()

        hook = row.optimizer.register_step_pre_hook(keep_first_grads)
        losses = [row.step(random_batches(cfg, i), i) for i in range(STEPS)]
        hook.remove()
        out[name] = dict(
            losses=losses,
            grads=grads,
            fp8_modules=sum(isinstance(m, Float8Linear) for m in stage.modules()),
            fp8_cast_weights=sum(
                isinstance(getattr(p, "_local_tensor", p), WeightWithDynamicFloat8CastTensor)
                for p in stage.parameters()
            ),
        )
        row.close()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(res: dict, loss_tol: float, grad_tol: float) -> list[str]:
    """What differs from expectations, as lines (empty: all as expected). Every FP8 case: all projections
    converted (FP8-cast weights only under FP8 all-gather), every step's loss within `loss_tol` of the case
    without FP8 but not equal to it, the first step's gradients of every parameter within `grad_tol`
    (relative norm) and the projections' not identical. FP8 all-gather against the local cast: the same
    FP8 numerics (the weight is cast from float32 instead of from its bf16 copy): as close as to no-fp8."""
    bad = []
    ref = res["no-fp8"]
    if ref["fp8_modules"] or ref["fp8_cast_weights"]:
        bad.append(f"no-fp8: {ref['fp8_modules']} Float8Linear, {ref['fp8_cast_weights']} FP8-cast weights")
    for name, got in res.items():
        if name == "no-fp8":
            continue
        cast = PROJECTIONS if name == "fp8" else 0
        if got["fp8_modules"] != PROJECTIONS or got["fp8_cast_weights"] != cast:
            bad.append(
                f"{name}: {got['fp8_modules']} Float8Linear, {got['fp8_cast_weights']} FP8-cast weights"
            )
        for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
            if not 0 < abs(a - b) / b < loss_tol:
                bad.append(f"{name}: step {step} loss {a} vs no-fp8 {b}")
        for key, g in ref["grads"].items():
            err = _rel(got["grads"][key], g)
            if err > grad_tol or (".layers." in key and "_proj" in key and err == 0):
                bad.append(f"{name}: grad {key} differs from no-fp8 by {err:.3g}")
    if "fp8" in res:
        for a, b in zip(res["fp8"]["losses"], res["fp8-local-cast"]["losses"]):
            if abs(a - b) / b > loss_tol:
                bad.append(f"fp8 all-gather vs local cast: loss {a} vs {b}")
    return bad


def grad_errors(res: dict) -> dict[str, float]:
    """Each FP8 case's largest first-step gradient difference from no-fp8 (for the test's output)."""
    ref = res["no-fp8"]["grads"]
    return {
        name: max(_rel(got["grads"][k], g) for k, g in ref.items())
        for name, got in res.items()
        if name != "no-fp8"
    }


def scale_hooks(rank: int, world: int) -> dict:
    """Rank function: with FP8 all-gather, how many optimizer post-step hooks remain after each of 2 steps,
    and whether every FP8 weight then holds a precomputed scale - for full fine-tuning (the scales follow
    every update) and for LoRA (frozen FP8 weights: computed once, then the hook is gone; the cast-once
    cache off). Then ("cache") LoRA without and with the cache: how many modules hold a cached FP8 weight
    and the 2 steps' losses under each recipe."""
    from transformers import AutoConfig

    from bench.common import random_batches
    from bench.train import EngineRow
    from parallel.dims import ParallelDims
    from trainer.config import build_config
    from trainer.training_kind import training_kind

    def build(overrides: dict) -> tuple:
        raw = {
            "model": {"config": dict(MODEL), "dtype": "bfloat16"},
            "training": {"seq_len": 128, "steps": 2, "device": "cpu"},
            "data": {"doc_mask": False},
        }
        cfg = build_config(raw, {"training.fp8": True, **overrides})
        fields = dict(cfg.model.config)
        kind = training_kind(cfg, AutoConfig.for_model(fields.pop("model_type"), **fields))
        dims = ParallelDims.from_config(cfg.parallel, world)
        return cfg, EngineRow(cfg, dims.build_mesh("cpu"), dims, torch.device("cpu"), kind)

    def cached(row: EngineRow) -> int:
        return sum(getattr(m, "fp8_weight_t", None) is not None for m in row.engine.stage.modules())

    out = {}
    lora = {"lora.r": 4, "training.fp8_cache_frozen": False}
    for name, extra in (("full", {}), ("lora", lora)):
        cfg, row = build({"training.fp8_all_gather": True, **extra})
        hooks = []
        for i in range(2):
            row.step(random_batches(cfg, i), i)
            hooks.append(len(row.optimizer._optimizer_step_post_hooks))
        weights = [
            p
            for n, p in row.engine.stage.named_parameters()
            if n.endswith("_proj.weight") or "base_layer.weight" in n
        ]
        scaled = [getattr(p._local_tensor, "_precomputed_scale", None) is not None for p in weights]
        out[name] = dict(hooks=hooks, weights=len(weights), scaled=all(scaled))
        row.close()
    out["cache"] = {}
    for cache in (False, True):
        got = out["cache"][cache] = {}
        for recipe in ("tensorwise", "rowwise"):
            cfg, row = build({**lora, "training.fp8_cache_frozen": cache, "training.fp8_recipe": recipe})
            got[recipe] = [row.step(random_batches(cfg, i), i) for i in range(2)]
            got["cached"] = cached(row)
            row.close()
    return out
