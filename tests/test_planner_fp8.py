"""The planner's FP8 model (training.fp8): projection GEMMs at the FP8 rate, the LM head at bf16's, the cast
traffic in the memory-bound term, FP8 all-gather bytes; rates read from a calibration file."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoConfig

from parallel.dims import ConfigError
from parallel.planner import Layout, ModelShape, Workload, load_rates, step_time
from parallel.planner.calibration import DEFAULT_CALIBRATION
from parallel.planner.cost import fp8_cast_bytes
from tests.test_planner import LLAMA_8B
from trainer.config import build_config

RATES = load_rates()


def _shape():
    fields = dict(LLAMA_8B)
    return ModelShape.from_hf(AutoConfig.for_model(fields.pop("model_type"), **fields))


def test_fp8_halves_the_projection_matmuls_only():
    shape, lay = _shape(), Layout(1, 1, 1, 8, 8, "zigzag")
    bf16 = Workload(seq_len=65536, activation_checkpointing="full")
    fp8 = dataclasses.replace(bf16, fp8=True)
    a, b = step_time(shape, lay, bf16, RATES), step_time(shape, lay, fp8, RATES)
    tokens = 65536 // 8
    head = 6 * tokens * shape.vocab * shape.hidden / (RATES.matmul_tflops * 1e12)
    layers_bf16 = a.matmul - head
    assert RATES.fp8_rate() == 2 * RATES.matmul_tflops  # the built-in file has no measured FP8 rate
    assert b.matmul == pytest.approx(head + layers_bf16 / 2, rel=1e-9)
    assert b.recompute < a.recompute and b.attention == a.attention
    # The casts: more memory-bound bytes, by exactly fp8_cast_bytes per token and layer (x (3 + ac) / 3),
    # plus each weight cast in the forward, the recompute and the input gradient (5 bytes per parameter).
    cast = fp8_cast_bytes(shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate)
    weights = 3 * 5 * shape.layers * shape.layer_matmul_params()
    extra = (tokens * shape.layers * cast * (3 + 1) / 3 + weights) / (RATES.elementwise_gbps * 1e9)
    assert b.memory_bound - a.memory_bound == pytest.approx(extra, rel=1e-9)
    assert b.tokens_per_s_per_gpu > a.tokens_per_s_per_gpu
    # float32 compute never runs FP8: nothing changes.
    f32 = dataclasses.replace(bf16, compute_bytes=4)
    assert step_time(shape, lay, dataclasses.replace(f32, fp8=True), RATES) == step_time(
        shape, lay, f32, RATES
    )


def test_fp8_all_gather_shrinks_fsdp_traffic():
    shape, lay = _shape(), Layout(8, 1, 1, 1, 1, None)
    base = Workload(seq_len=8192, fp8=True)
    gather = dataclasses.replace(base, fp8_all_gather=True)
    assert step_time(shape, lay, gather, RATES).fsdp_comm <= step_time(shape, lay, base, RATES).fsdp_comm


def test_calibrated_fp8_rates_and_workload_from_config(tmp_path):
    raw = json.load(open(DEFAULT_CALIBRATION, encoding="utf-8"))
    path = tmp_path / "calib.json"
    path.write_text(json.dumps({**raw, "fp8_matmul_tflops": 1200.0, "fp8_rowwise_matmul_tflops": 1000.0}))
    rates = load_rates(str(path))
    assert rates.fp8_rate("tensorwise") == 1200.0 and rates.fp8_rate("rowwise") == 1000.0
    path.write_text(json.dumps({**raw, "fp8_matmul_tflops": -1}))
    with pytest.raises(ConfigError, match="positive"):
        load_rates(str(path))
    cfg = build_config(
        {
            "model": {"config": LLAMA_8B, "dtype": "bfloat16"},
            "training": {"seq_len": 4096, "fp8": False, "fp8_recipe": "rowwise"},
        }
    )
    assert Workload.from_config(cfg).fp8 is False
    cfg.training.fp8 = True  # (set after validation: this machine need not have torchao)
    work = Workload.from_config(cfg)
    assert work.fp8 and work.fp8_recipe == "rowwise" and not work.fp8_all_gather  # rowwise: no FP8 gather
    cfg.training.fp8_recipe = "tensorwise"
    assert Workload.from_config(cfg).fp8_all_gather


def test_frozen_weight_cache_memory():
    """training.fp8_cache_frozen under LoRA: two FP8 copies (2 bytes) of every projection weight on a rank
    that holds them whole; nothing where FSDP or TP shards them, or without LoRA."""
    from parallel.planner import memory_breakdown

    shape = _shape()
    lora = Workload(seq_len=32768, fp8=True, lora_rank=16, lora_targets=("q_proj", "down_proj"))
    cached = dataclasses.replace(lora, fp8_cache_frozen=True)
    one, two = Layout(1, 1, 1, 1, 1, None), Layout(1, 1, 1, 2, 2, "zigzag")
    extra = memory_breakdown(shape, one, cached).total - memory_breakdown(shape, one, lora).total
    assert extra == 2 * shape.layers * shape.layer_matmul_params()
    assert memory_breakdown(shape, two, cached) == memory_breakdown(shape, two, lora)
    offload = dataclasses.replace(cached, fsdp_cpu_offload=True)
    assert memory_breakdown(shape, one, offload) == memory_breakdown(
        shape, one, dataclasses.replace(lora, fsdp_cpu_offload=True)
    )
    full = Workload(seq_len=32768, fp8=True)
    assert memory_breakdown(shape, one, dataclasses.replace(full, fp8_cache_frozen=True)) == memory_breakdown(
        shape, one, full
    )
    raw = {"model": {"config": dict(LLAMA_8B)}, "training": {"seq_len": 1024}}
    assert Workload.from_config(build_config(raw, {"training.fp8": True, "lora.r": 8})).fp8_cache_frozen
    assert not Workload.from_config(build_config(raw, {"training.fp8": True})).fp8_cache_frozen


def test_recipes_edge_layers_and_weight_casts():
    """rowwise_with_gw_hp runs the weight gradient's GEMM at the bf16 rate (none under LoRA: as fast as
    rowwise there); fp8_bf16_layers moves that share of the layers back to bf16; the frozen-weight cache
    removes the weight casts (3 x 5 bytes per parameter under checkpointing), and only them."""
    shape, one = _shape(), Layout(1, 1, 1, 1, 1, None)
    hbm = RATES.elementwise_gbps * 1e9
    full = Workload(seq_len=32768, activation_checkpointing="full_keep_attn", fp8=True, fp8_recipe="rowwise")
    gw_hp = dataclasses.replace(full, fp8_recipe="rowwise_with_gw_hp")
    t_rw, t_hp = step_time(shape, one, full, RATES), step_time(shape, one, gw_hp, RATES)
    tokens, p = 32768, shape.layers * shape.layer_matmul_params()
    wgrad = 2 * tokens * p * (1 / (RATES.matmul_tflops * 1e12) - 1 / (RATES.fp8_rate("rowwise") * 1e12))
    assert t_hp.matmul - t_rw.matmul == pytest.approx(wgrad, rel=1e-9)
    assert t_hp.memory_bound < t_rw.memory_bound  # no FP8 copies for the weight gradient's GEMM
    lora = dataclasses.replace(full, lora_rank=16, lora_targets=("q_proj", "v_proj"))
    lora_hp = dataclasses.replace(lora, fp8_recipe="rowwise_with_gw_hp")
    assert step_time(shape, one, lora_hp, RATES) == step_time(shape, one, lora, RATES)
    cached = dataclasses.replace(lora, fp8_cache_frozen=True)
    saved = (
        step_time(shape, one, lora, RATES).memory_bound - step_time(shape, one, cached, RATES).memory_bound
    )
    assert saved == pytest.approx(3 * 5 * p / hbm, rel=1e-9)
    two = Layout(1, 1, 1, 2, 2, "zigzag")  # FSDP-sharded over cp: the cache is off, every matmul casts
    assert step_time(shape, two, cached, RATES) == step_time(shape, two, lora, RATES)
    from parallel.planner import memory_breakdown

    half_cached = dataclasses.replace(cached, fp8_bf16_layers=shape.layers // 4)  # half the layers cached
    assert memory_breakdown(shape, one, cached).params - memory_breakdown(shape, one, half_cached).params == p
    bf16 = step_time(shape, one, dataclasses.replace(full, fp8=False), RATES)
    half = step_time(shape, one, dataclasses.replace(full, fp8_bf16_layers=shape.layers // 4), RATES)
    assert half.matmul == pytest.approx((bf16.matmul + t_rw.matmul) / 2, rel=1e-9)
    assert bf16.memory_bound < half.memory_bound < t_rw.memory_bound
    raw = {"model": {"config": dict(LLAMA_8B)}, "training": {"seq_len": 1024, "fp8_bf16_layers": 2}}
    assert Workload.from_config(build_config(raw)).fp8_bf16_layers == 2
