"""training.fp8: the config path, the module swap (which linears become torchao Float8Linear), and FP8
training on CPU against the same model without FP8 - single process, LoRA, and under TP and CP on 2 gloo
ranks.

torchao's Float8Linear runs on CPU (torch's CPU `_scaled_mm`, e4m3/e5m2 rounding as on the GPU), so the
numerics are checked here; FSDP2's FP8 all-gather is not (gloo cannot all-gather float8 bytes) and neither
is the speed: tests/test_gpu_fp8.py and bench/fp8.py need a Hopper GPU.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from models.fp8 import PROJECTIONS, is_projection, torchao_missing
from tests import fp8_engines
from tests.dist import run_distributed
from trainer.config import ConfigError, build_config
from trainer.config_checks import validate_device_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_torchao = pytest.mark.skipif(torchao_missing() is not None, reason="torchao not installed (.[fp8])")
TINY = fp8_engines.MODEL  # the tiny Llama of every FP8 check


def _raw(**training):
    return {"model": {"config": dict(TINY)}, "training": {"seq_len": 64, **training}}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- config path ------------------------------------------------------------------------------------------


def test_fp8_without_torchao_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ConfigError) as err:
        build_config(_raw(fp8=True))
    assert err.value.key == "training.fp8" and "pip install -e .[fp8]" in str(err.value)
    build_config(_raw(fp8=False))  # off: torchao is never needed


@needs_torchao
def test_fp8_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="parallel.engine=fsdp2"):
        build_config({**_raw(fp8=True), "parallel": {"engine": "deepspeed"}})
    with pytest.raises(ConfigError, match="must be one of tensorwise | rowwise"):
        build_config(_raw(fp8=True, fp8_recipe="blockwise"))
    cfg = build_config(_raw(fp8=True))
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        validate_device_features(cfg, torch.device("cpu"))
    # An Ampere GPU (sm80) has no FP8 tensor cores; Hopper (sm90) passes.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    with pytest.raises(ConfigError, match="sm80"):
        validate_device_features(cfg, torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    validate_device_features(cfg, torch.device("cuda", 0))


def test_train_py_fp8_on_cpu_is_one_line(tmp_path):
    """A user's CPU launch with training.fp8=true: stderr is one `config error: training.fp8:` line and
    nothing else, exit code 2 (torchao missing, or installed but no FP8 GPU), nothing written. With torchao
    installed this process imports it (transformers does, and the check does), so its import noise on a CPU
    build of torch would show here."""
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config", "configs/demo.yaml", "training.fp8=true"]
    cmd += ["training.device=cpu", "parallel.dp=1", "parallel.cp=1", f"output_dir={out}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = res.stderr.splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("config error: training.fp8: "), res.stderr[-2000:]
    assert ("needs a CUDA GPU" in lines[0]) == (torchao_missing() is None), lines
    assert not (out / "config.yaml").exists()


def test_torchao_import_noise_filter(monkeypatch):
    """models/torchao_import_logs.py drops exactly torchao's CUDA-kernel load failures on a CPU build of
    torch and torch's pytree deprecation about torchao's enums; every other record passes."""
    import enum
    import logging

    from models.torchao_import_logs import _FILTER

    def record(name: str, msg: str, *args) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)

    so = "Failed to load /venv/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this library"
    enum_msg = (
        "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."
    )
    torchao_enum = enum.Enum("KernelPreference", "AUTO")
    torchao_enum.__module__ = "torchao.quantization.quantize_.common"
    own_enum = enum.Enum("Mode", "A")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    assert not _FILTER.filter(record("torchao", so))
    assert _FILTER.filter(record("torchao", "Skipping import of cpp extensions due to incompatible torch"))
    assert not _FILTER.filter(record("torch.utils._pytree", enum_msg, torchao_enum))
    assert _FILTER.filter(record("torch.utils._pytree", enum_msg, own_enum))
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA build: a failed kernel load is news
    assert _FILTER.filter(record("torchao", so))
    assert all(_FILTER in logging.getLogger(n).filters for n in ("torchao", "torch.utils._pytree"))


# ---- the module swap --------------------------------------------------------------------------------------


def _stage(seed: int = 0, lora: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.causal_lm import CausalLMStage

    fields = dict(TINY)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    if lora:
        from peft import LoraConfig, get_peft_model

        hf = get_peft_model(
            hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
        )
        for name, p in hf.named_parameters():  # a trained adapter: B != 0, so the adapter path matters
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02)
        hf = hf.base_model.model
    return CausalLMStage(hf, loss_chunk=32)


def test_projection_filter():
    assert is_projection(nn.Linear(64, 32), "self_attn.k_proj")
    assert is_projection(nn.Linear(64, 32), "self_attn.k_proj.base_layer")  # frozen base under LoRA
    assert not is_projection(nn.Linear(64, 4), "self_attn.q_proj.lora_A.default")
    assert not is_projection(nn.Linear(4, 64), "self_attn.q_proj.lora_B.default")
    assert not is_projection(nn.Linear(64, 256), "lm_head")
    assert not is_projection(nn.Linear(24, 32), "mlp.up_proj")  # FP8 GEMMs need multiples of 16
    assert not is_projection(nn.Embedding(10, 16), "mlp.up_proj")


@needs_torchao
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_swap_and_numerics(recipe):
    """Every projection (7 per layer) becomes Float8Linear, nothing else does; the loss and gradients stay
    within FP8 rounding of the same model without FP8 - and differ from it (FP8 really runs)."""
    from torchao.float8.float8_linear import Float8Linear

    from models.fp8 import convert_projections

    ref = _stage()
    stage = copy.deepcopy(ref)
    layers = list(stage.model.layers.values())
    names = convert_projections(layers, recipe)
    assert len(names) == 7 * len(layers) and {n.rsplit(".", 1)[-1] for n in names} == PROJECTIONS
    fp8 = {n for n, m in stage.named_modules() if isinstance(m, Float8Linear)}
    assert len(fp8) == 7 * len(layers)
    assert type(stage.lm_head) is nn.Linear and type(stage.model.embed_tokens) is nn.Embedding
    seed = int(torch.randint(0, 2**31, ()).item())
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (2, 65), generator=gen)
    pos = torch.arange(64)[None].expand(2, -1)
    losses, grads = [], []
    for model in (ref, stage):
        loss = model(ids[:, :-1], pos, labels=ids[:, 1:]).sum()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert 1e-7 < _rel(losses[1], losses[0]) < 2e-2, (seed, losses)
    for name, g in grads[0].items():
        assert _rel(grads[1][name], g) < 0.25, (seed, name, _rel(grads[1][name], g))


@needs_torchao
def test_bf16_edge_layers():
    """training.fp8_bf16_layers=n: the model's first and last n layers keep nn.Linear projections, on
    whichever pipeline stage they are; n that leaves no layer in FP8 is a config error naming the key."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.causal_lm import CausalLMStage
    from models.fp8 import convert_projections, fp8_layers
    from trainer.layout import validate_run

    fields = {**TINY, "num_hidden_layers": 4}
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    whole, last_stage = CausalLMStage(hf), CausalLMStage(hf, first_layer=2)
    assert fp8_layers(whole, 0) == list(whole.model.layers.values())
    assert fp8_layers(whole, 1) == [whole.model.layers["1"], whole.model.layers["2"]]
    assert fp8_layers(last_stage, 1) == [last_stage.model.layers["2"]]
    assert len(convert_projections(fp8_layers(whole, 1), "tensorwise")) == 14
    kinds = {k: type(layer.mlp.down_proj).__name__ for k, layer in whole.model.layers.items()}
    assert kinds == {"0": "Linear", "1": "Float8Linear", "2": "Float8Linear", "3": "Linear"}, kinds
    with pytest.raises(ConfigError) as err:  # TINY has 2 layers: one at each end leaves none
        validate_run(build_config(_raw(fp8=True, fp8_bf16_layers=1)), 1, device_type="cpu")
    assert err.value.key == "training.fp8_bf16_layers" and "none of the model's 2 layers" in str(err.value)
    with pytest.raises(ConfigError, match="training.fp8_bf16_layers"):
        build_config(_raw(fp8=True, fp8_bf16_layers=-1))


@needs_torchao
def test_swap_under_lora():
    """peft LoRA: the frozen base layers compute in FP8, the adapters stay nn.Linear and alone get
    gradients; the loss stays within FP8 rounding of the LoRA model without FP8."""
    from torchao.float8.float8_linear import Float8Linear

    from models.fp8 import convert_projections

    ref = _stage(lora=True)
    stage = copy.deepcopy(ref)
    names = convert_projections(list(stage.model.layers.values()), "tensorwise")
    assert len(names) == 7 * TINY["num_hidden_layers"]
    for name, m in stage.named_modules():
        if ".lora_" in name and isinstance(m, nn.Linear):
            assert type(m) is nn.Linear, name
        if name.endswith("q_proj.base_layer") or name.endswith("k_proj"):
            assert isinstance(m, Float8Linear), name
    ids = torch.randint(0, TINY["vocab_size"], (1, 65))
    pos = torch.arange(64)[None]
    out = [m(ids[:, :-1], pos, labels=ids[:, 1:]).sum() for m in (ref, stage)]
    out[1].backward()
    assert 1e-7 < _rel(out[1].detach(), out[0].detach()) < 2e-2
    with_grad = {n for n, p in stage.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)


@needs_torchao
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_frozen_weights_cast_once(recipe):
    """training.fp8_cache_frozen: every frozen projection of a LoRA model becomes a FrozenFloat8Linear;
    once cached, the loss and the adapters' gradients are Float8Linear's bit for bit, in eager layers and
    (rowwise) compiled ones (bf16), the cache is not part of the state dict, and the matmuls read the cache,
    not the weight (spoiling the weight afterwards changes nothing). tests/test_gpu_fp8.py runs the same on
    CUDA."""
    frozen_cache_check(recipe, torch.device("cpu"), compiled=recipe == "rowwise")  # compiling: ~1 min on CI


def frozen_cache_check(recipe: str, device: torch.device, compiled: bool, compiled_tol: float = 0.0) -> None:
    """The checks of test_frozen_weights_cast_once on `device`, eager and (`compiled`) compiled too.
    Compiled, the uncached path casts the weight inside the compiled graph and the cache outside it:
    `compiled_tol` > 0 allows that much relative difference there (a scale that Triton's division rounds
    one ulp apart from eager's moves a few FP8 values by one step; a wrong cast moves all of them)."""
    from torchao.float8.float8_linear import Float8Linear

    from models.fp8 import cache_frozen_weights, convert_projections
    from models.fp8_frozen import FrozenFloat8Linear

    seed = int(torch.randint(0, 2**31, ()).item())
    ref = _stage(seed, lora=True).to(device=device, dtype=torch.bfloat16)
    plain, cached = copy.deepcopy(ref), copy.deepcopy(ref)
    convert_projections(list(plain.model.layers.values()), recipe)
    convert_projections(list(cached.model.layers.values()), recipe, cache_frozen=True)
    frozen = [m for m in cached.modules() if isinstance(m, FrozenFloat8Linear)]
    assert len(frozen) == 7 * TINY["num_hidden_layers"]
    assert not any(type(m) is FrozenFloat8Linear for m in plain.modules())
    assert sum(type(m) is Float8Linear for m in plain.modules()) == len(frozen)
    assert cache_frozen_weights(cached, torch.bfloat16, device) == len(frozen)
    assert cached.state_dict().keys() == plain.state_dict().keys()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (2, 65), generator=gen).to(device)
    pos = torch.arange(64, device=device)[None].expand(2, -1)

    def run(model):
        model.zero_grad()
        loss = model(ids[:, :-1], pos, labels=ids[:, 1:]).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    for compile_now in (False, True) if compiled else (False,):
        if compile_now:
            for model in (plain, cached):
                for layer in model.model.layers.values():
                    layer.compile(dynamic=False)
        (loss_a, grads_a), (loss_b, grads_b) = run(plain), run(cached)
        tol = compiled_tol if compile_now else 0.0
        assert _rel(loss_b, loss_a) <= tol, (seed, compile_now, loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys() and all("lora_" in n for n in grads_a)
        for name, g in grads_a.items():
            assert _rel(grads_b[name], g) <= tol, (seed, compile_now, name, _rel(grads_b[name], g))
    with torch.no_grad():
        for m in frozen:
            m.weight.mul_(0.5)
    assert torch.equal(run(cached)[0], loss_b), seed


def test_fp8_cache_frozen_only_for_whole_weights():
    """The cache holds whole weights: on when each rank holds them whole (one GPU, dp_replicate), off
    under TP or FSDP sharding over dp x cp, with FSDP CPU offload, and when asked."""
    from models.parallelize import fp8_cache_frozen
    from parallel.dims import ParallelDims

    def on(world: int, **parallel) -> bool:
        over = {"training.fp8": True, **{f"parallel.{k}": v for k, v in parallel.items()}}
        cfg = build_config(_raw(), over)
        return fp8_cache_frozen(cfg, ParallelDims.from_config(cfg.parallel, world))

    assert on(1) and on(2, dp_replicate=2)
    assert not on(2) and not on(2, cp=2) and not on(2, tp=2) and not on(1, fsdp_cpu_offload=True)
    cfg = build_config(_raw(), {"training.fp8": True, "training.fp8_cache_frozen": False})
    assert not fp8_cache_frozen(cfg, ParallelDims.from_config(cfg.parallel, 1))
    cfg = build_config(_raw(), {})
    assert not fp8_cache_frozen(cfg, ParallelDims.from_config(cfg.parallel, 1))


# ---- under TP and CP (2 gloo ranks) -----------------------------------------------------------------------


def _train(rank: int, world: int, cases: list[tuple[str, dict]]) -> dict:
    from torch.distributed.tensor import DTensor
    from torchao.float8.float8_linear import Float8Linear

    from bench.common import random_batches
    from bench.train import EngineRow
    from parallel.dims import ParallelDims

    out = {}
    for name, overrides in cases:
        raw = _raw(steps=3)
        raw["model"]["dtype"] = "float32"
        raw["data"] = {"doc_mask": False}
        cfg = build_config(raw, overrides)
        dims = ParallelDims.from_config(cfg.parallel, world)
        row = EngineRow(cfg, dims.build_mesh("cpu"), dims, torch.device("cpu"))
        f8 = [m for m in row.engine.stage.modules() if isinstance(m, Float8Linear)]
        sharded = sum(
            isinstance(m.weight, DTensor) and "tp" in (m.weight.device_mesh.mesh_dim_names or ()) for m in f8
        )
        losses = [row.step(random_batches(cfg, i), i) for i in range(3)]
        out[name] = dict(losses=losses, fp8_modules=len(f8), sharded=sharded)
        row.close()
    return out


@needs_torchao
def test_fp8_training_under_cp_and_tp():
    """3 AdamW steps through the trainer's step (FSDP2 over 2 ranks): FP8 with ring CP=2 and with TP=2
    stays within 0.2% of the same run without FP8 at every step; the fused loss equals the chunked one."""
    cp = {"parallel.cp": 2, "parallel.cp_strategy": "ring"}
    tp = {"parallel.tp": 2}
    fp8 = {"training.fp8": True, "training.fp8_all_gather": False}  # gloo cannot all-gather FP8
    cases = [
        ("cp2", cp),
        ("cp2-fp8", {**cp, **fp8}),
        ("cp2-fp8-rowwise", {**cp, **fp8, "training.fp8_recipe": "rowwise"}),
        ("cp2-fused", {**cp, "training.loss_impl": "fused"}),
        ("tp2", tp),
        ("tp2-fp8", {**tp, **fp8}),
    ]
    res = run_distributed(_train, 2, cases, timeout=600)[0]
    n = 7 * TINY["num_hidden_layers"]
    assert res["cp2"]["fp8_modules"] == 0 and res["cp2-fp8"]["fp8_modules"] == n
    assert res["cp2-fp8"]["sharded"] == 0
    assert res["tp2-fp8"]["fp8_modules"] == n and res["tp2-fp8"]["sharded"] == n  # TP shards Float8Linear
    for fp8_case, ref in (("cp2-fp8", "cp2"), ("cp2-fp8-rowwise", "cp2"), ("tp2-fp8", "tp2")):
        for a, b in zip(res[fp8_case]["losses"], res[ref]["losses"]):
            assert 0 < abs(a - b) / b < 2e-3, (fp8_case, res[fp8_case]["losses"], res[ref]["losses"])
    for a, b in zip(res["cp2-fused"]["losses"], res["cp2"]["losses"]):
        assert abs(a - b) / b < 1e-5, (res["cp2-fused"]["losses"], res["cp2"]["losses"])


def _save_load_export(rank: int, world: int, tmp: str) -> dict:
    import torch.distributed.checkpoint as dcp

    from bench.train import EngineRow
    from parallel.dims import ParallelDims

    raw = _raw()
    raw["model"]["dtype"] = "float32"
    rows = {}
    for name, fp8 in (("plain", False), ("fp8", True)):
        cfg = build_config(raw, {"training.fp8": fp8, "training.fp8_all_gather": True})  # FP8-cast wrappers
        dims = ParallelDims.from_config(cfg.parallel, world)
        rows[name] = EngineRow(cfg, dims.build_mesh("cpu"), dims, torch.device("cpu"))
    engine = rows["fp8"].engine
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    wrapped = sum(
        isinstance(getattr(p, "_local_tensor", p), WeightWithDynamicFloat8CastTensor)
        for p in engine.stage.parameters()
    )
    dcp.save(engine.checkpoint_entries(), checkpoint_id=os.path.join(tmp, "ckpt"))
    with torch.no_grad():  # spoil the weights, then load them back
        for p in engine.stage.parameters():
            p.mul_(0.5)
    dcp.load(engine.checkpoint_entries(), checkpoint_id=os.path.join(tmp, "ckpt"))
    engine.export_hf(engine.stage.config, None, os.path.join(tmp, "hf"), "float32")
    rows["plain"].engine.export_hf(engine.stage.config, None, os.path.join(tmp, "hf_plain"), "float32")
    return wrapped


@needs_torchao
def test_fp8_all_gather_weights_checkpoint_and_export(tmp_path):
    """With FP8 all-gather the weights are torchao wrapper tensors: a DCP save/load round trip and the HF
    export still give exactly the weights of the same model without FP8 (same seed, no step taken)."""
    from safetensors.torch import load_file

    wrapped = run_distributed(_save_load_export, 2, str(tmp_path), timeout=600)[0]
    assert wrapped == 7 * TINY["num_hidden_layers"]
    fp8 = load_file(str(tmp_path / "hf" / "model.safetensors"))
    plain = load_file(str(tmp_path / "hf_plain" / "model.safetensors"))
    assert fp8.keys() == plain.keys() and any("q_proj" in k for k in fp8)
    for key, value in plain.items():
        assert type(fp8[key]) is torch.Tensor and torch.equal(fp8[key], value), key


@needs_torchao
def test_fp8_engine_one_rank_all_gather_and_grads():
    """FSDP2 on one gloo rank, bf16 compute: FP8 all-gather (the weight shard cast to FP8 with the scales
    of the optimizer's post-step hook), the local cast and rowwise each stay within FP8 rounding of the same
    run without FP8 in every step's loss and the first step's gradients (tests/fp8_engines.py)."""

    res = run_distributed(fp8_engines.train_cases, 1, "cpu", "bfloat16", fp8_engines.cases(True), timeout=600)
    print("largest gradient difference from no-fp8:", fp8_engines.grad_errors(res[0]))
    bad = fp8_engines.check(res[0], loss_tol=2e-3, grad_tol=0.25)
    assert not bad, bad


@needs_torchao
def test_fp8_scale_hook_once_for_frozen_weights():
    """FP8 all-gather's scale hook: kept for full fine-tuning, gone after the first step under LoRA (its FP8
    weights are frozen, so their scales are final); both leave a precomputed scale on every FP8 weight.
    Through the same engine, LoRA with the frozen weights cast once (training.fp8_cache_frozen) trains
    exactly as LoRA casting them in every matmul, tensorwise and rowwise."""
    res = run_distributed(fp8_engines.scale_hooks, 1, timeout=600)[0]
    cache = res.pop("cache")
    assert res["full"]["hooks"] == [1, 1] and res["lora"]["hooks"] == [0, 0], res
    assert all(r["weights"] == fp8_engines.PROJECTIONS and r["scaled"] for r in res.values()), res
    # The cast-once cache (on by default on one rank): bit-identical to casting in every matmul.
    assert cache[True]["cached"] == fp8_engines.PROJECTIONS and cache[False]["cached"] == 0, cache
    for recipe in ("tensorwise", "rowwise"):
        assert cache[True][recipe] == cache[False][recipe], (recipe, cache)
