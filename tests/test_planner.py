"""Layout planner: enumeration and validity, memory arithmetic, cost ranking, the --plan CLI, calibration
(auto resolution: tests/test_planner_auto.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoConfig

from parallel.cp.ring import BACKWARD_ROWS
from parallel.dims import ConfigError, ParallelDims
from parallel.planner import (
    Layout,
    ModelShape,
    Workload,
    compare_with_measurements,
    enumerate_layouts,
    load_rates,
    memory_breakdown,
    plan_rows,
    step_time,
)
from parallel.planner.cost import group_spans
from trainer.config import Config, ModelConfig, ParallelConfig, TrainingConfig, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATES = load_rates()


def hf(heads=8, kv=8, layers=8, head_dim=16, **kw):
    fields = dict(
        hidden_size=heads * head_dim, intermediate_size=64, vocab_size=128, tie_word_embeddings=False
    )
    fields.update(kw)
    return AutoConfig.for_model(
        "llama", num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=layers, **fields
    )


LLAMA_8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=1 << 20,
    tie_word_embeddings=False,
)


def config(model: dict, seq_len: int, ac: str = "full", **parallel) -> Config:
    cfg = Config(
        model=ModelConfig(config=model, dtype="bfloat16"),
        parallel=ParallelConfig(activation_checkpointing=ac, **parallel),
        training=TrainingConfig(seq_len=seq_len),
    )
    validate(cfg)
    return cfg


def hf_of(cfg: Config):
    fields = dict(cfg.model.config)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


# ---- enumeration ------------------------------------------------------------------------------------


def test_enumeration_counts_for_8_ranks():
    # 20 ordered (dp, tp, pp, cp) with product 8; cp=1 -> 1 layout, cp=2 -> 2 splits x 2 layouts,
    # cp=4 -> 3 x 2, cp=8 -> 4 x 2: 10*1 + 6*4 + 3*6 + 1*8 = 60.
    cands = enumerate_layouts(8, hf(), 4096, pp_supported=True)
    assert len(cands) == 60
    assert len({c.layout for c in cands}) == 60
    assert all(c.reason is None for c in cands)  # 8 heads, 8 kv heads, 8 layers: everything fits
    # Without PP only the 36 pp=1 layouts stay valid.
    no_pp = enumerate_layouts(8, hf(), 4096, pp_supported=False)
    assert sum(c.reason is None for c in no_pp) == 36
    assert all("pipeline" in c.reason for c in no_pp if c.layout.pp > 1)
    fixed = enumerate_layouts(8, hf(), 4096, fixed=dict(dp=1, tp=1, pp=1, cp=8))
    assert sorted(c.layout.strategy_label() for c in fixed) == sorted(
        f"{s} {lay}"
        for s in ("ring r8", "hybrid u2xr4", "hybrid u4xr2", "ulysses u8")
        for lay in ("zigzag", "contig")
    )


def test_validity_reasons():
    cands = {c.layout: c for c in enumerate_layouts(8, hf(heads=4, kv=2, layers=2), 24, pp_supported=True)}
    assert cands[Layout(1, 1, 1, 8, 8, "contiguous")].reason.startswith(
        "parallel.cp: num_attention_heads per tp rank (4/1 = 4) is not divisible by the ulysses degree 8"
    )
    assert cands[Layout(2, 4, 1, 1, 1, None)].reason.startswith("parallel.tp: num_key_value_heads=2")
    assert cands[Layout(1, 1, 4, 2, 1, "zigzag")].reason == "parallel.pp: pp=4 exceeds num_hidden_layers=2"
    # 24 tokens split into 2*8 zigzag chunks fails, 8 contiguous shards work.
    assert cands[Layout(1, 1, 1, 8, 1, "zigzag")].reason.startswith(
        "training.seq_len: 24 is not divisible by 2*cp"
    )
    assert cands[Layout(1, 1, 1, 8, 1, "contiguous")].reason is None
    # 2 kv heads under ulysses 4 are replicated, which the trainer allows with a note.
    rep = cands[Layout(2, 1, 1, 4, 4, "contiguous")]
    assert rep.reason is None and "replicated 2x" in rep.notes[0]
    tied = enumerate_layouts(2, hf(tie_word_embeddings=True), 64, pp_supported=True)
    assert {c.reason for c in tied if c.layout.pp == 2} == {
        "parallel.pp: tied input/output embeddings live on different stages"
    }
    # Every valid layout is accepted by the trainer's own ParallelDims.
    for c in cands.values():
        if c.reason is None:
            pcfg = ParallelConfig(**c.layout.parallel_fields())
            assert ParallelDims.from_config(pcfg, 8).cp == c.layout.cp


# ---- memory -----------------------------------------------------------------------------------------

SMALL = ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=100)


def test_memory_arithmetic_exact():
    work = Workload(seq_len=64, micro_batch_size=1, compute_bytes=2, loss_chunk=16)
    mem = memory_breakdown(SMALL, Layout(1, 1, 1, 2, 1, "zigzag"), work)
    # layer: q+o 2*64*4*16 = 8192, k+v 2*64*2*16 = 4096, mlp 3*64*128 = 24576, norms 128 -> 36992
    # root: embedding + head 2*100*64 + final norm 64 = 12864; stage 2*36992 + 12864 = 86848, F = 2
    assert (mem.params, mem.grads, mem.optimizer) == (4 * 43424, 4 * 43424, 8 * 43424)
    # root 2*12864 + head grad 2*6400 + two gathered layers 2*2*36992 + one layer's grads (2+4)*36992
    assert mem.gathered == 25728 + 12800 + 147968 + 221952
    # per token: norms (models/norm.py) 2*(2*64 + 4) = 264, q/k/v 2*(4+2*2)*16 = 256, out (pure ring: one
    # copy) 2*4*16 = 128, lse 16, mlp 4*2*128 = 1024 -> 1688; T = 32: 2 layers + 1 working layer + final
    # norm (2*64 + 4)*32
    assert mem.activations == 3 * 1688 * 32 + 132 * 32
    # fp32 out/dq 4*4*16 + lse 16 + dk/dv 8*2*16 = 528; backward: dO 2*4*16 + bf16 dk/dv 2*2*2*16 +
    # residual grads 2*2*64 = 512; ring: 2 kv blocks 4*2*2*16 + dkv 8*2*16 = 512; one kernel call over all
    # 32 rows: O/dO copies + dq 3*2*16, fp32 dQ workspace 4*16, stats 4 -> 164 per head
    assert mem.attention == (528 + 512 + 512) * 32 + 32 * 4 * 164
    # past BACKWARD_ROWS local tokens a backward kernel call's temporaries stop growing
    long = Workload(seq_len=4 * BACKWARD_ROWS, compute_bytes=2)
    per_token = 528 + 512 + 512
    assert memory_breakdown(SMALL, Layout(1, 1, 1, 2, 1, "zigzag"), long).attention == (
        per_token * 2 * BACKWARD_ROWS + BACKWARD_ROWS * 4 * 164
    )
    # a checkpointed chunk's backward: fp32 log-softmax, the two fp32 gradients, the recomputed bf16 logits
    assert mem.logits == 16 * 100 * (2 + 12)
    # the whole local sequence (32 tokens) in one chunk runs without checkpoint: no recomputed bf16 logits
    one_chunk = memory_breakdown(
        SMALL, Layout(1, 1, 1, 2, 1, "zigzag"), dataclasses.replace(work, loss_chunk=32)
    )
    assert one_chunk.logits == 32 * 100 * 12
    # the MLP backward's gradients: 3*2*128 per token
    assert (mem.saved_activations, mem.mlp_working, mem.mlp_grads, mem.gathered_root) == (
        2 * 1688 * 32,
        32768,
        24576,
        25728 + 12800,
    )
    # peak = params + AdamW + max(layer phase, loss phase). Layer phase: gathered, one layer's working set
    # (1688 + 132 per token), the larger of the MLP gradients and the attention buffers beyond the freed
    # MLP (70656 - 32768), and - no gradient accumulation, so the step starts without gradients - the
    # larger of the saved activations and the gradients backward builds while freeing them.
    working = (1688 + 132) * 32
    layer_phase = 408448 + working + (70656 - 32768) + max(2 * 1688 * 32, 4 * 43424)
    loss_phase = 38528 + 2 * 1688 * 32 + 22400
    assert mem.total == 173696 + 347392 + max(layer_phase, loss_phase)
    # with gradient accumulation the gradients stay for the whole step, beside the saved activations
    acc = memory_breakdown(SMALL, Layout(1, 1, 1, 2, 1, "zigzag"), dataclasses.replace(work, grad_accum=2))
    layer_phase = 408448 + working + (70656 - 32768) + 2 * 1688 * 32
    assert acc.total == 2 * 173696 + 347392 + max(layer_phase, loss_phase)


def test_memory_monotonic():
    shape = ModelShape.from_hf(hf_of(config(LLAMA_8B, 8192)))
    lay = Layout(1, 1, 1, 8, 8, "zigzag")

    def total(layout=lay, **kw):
        base = dict(seq_len=65536, activation_checkpointing="none")
        return memory_breakdown(shape, layout, Workload(**{**base, **kw})).total

    assert total(seq_len=131072) > total() > total(seq_len=32768)
    act = [
        memory_breakdown(shape, Layout(8 // c, 1, 1, c, 1, "zigzag"), Workload(seq_len=65536)).activations
        for c in (1, 2, 4, 8)
    ]
    assert act == sorted(act, reverse=True) and len(set(act)) == 4
    assert (
        total(activation_checkpointing="full")
        < total(activation_checkpointing="selective")
        < total(activation_checkpointing="none")
    )
    # Sharding more ways (dp x cp) shrinks the optimizer state; TP shrinks the layer activations.
    assert memory_breakdown(shape, lay, Workload(seq_len=8192)).optimizer * 8 == pytest.approx(
        memory_breakdown(shape, Layout(1, 1, 1, 1, 1, None), Workload(seq_len=8192)).optimizer, rel=1e-6
    )
    assert total(Layout(1, 2, 1, 4, 4, "zigzag")) < total(Layout(2, 1, 1, 4, 4, "zigzag"))


# ---- cost and ranking -------------------------------------------------------------------------------


def test_ranking_prefers_ulysses_on_nvlink_and_hybrid_when_heads_are_few():
    # 2k tokens per GPU: ring steps are too short to hide their transfers, the NVLink all-to-all wins.
    cfg = config(LLAMA_8B, 16384, cp_strategy="auto", cp=8)
    rows = plan_rows(cfg, 8, hf_of(cfg), fixed=dict(dp=1, tp=1, pp=1, cp=8))
    assert rows[0].layout.strategy == "ulysses" and rows[0].fits
    by = {r.layout.strategy_label(): r.time.tokens_per_s_per_gpu for r in rows}
    assert by["ulysses u8 zigzag"] > by["ring r8 zigzag"] > by["ring r8 contig"]

    few = dict(
        LLAMA_8B, num_attention_heads=4, num_key_value_heads=4, hidden_size=512, intermediate_size=1536
    )
    # 4 heads cannot be split 8 ways. With 4 GPUs per node, CP=8 spans two nodes: the hybrid keeps the
    # all-to-all inside the node and sends 1 ring step across instead of 7, so it wins; inside one node
    # the pure ring hides its transfers and wins.
    cfg = config(few, 16384, cp_strategy="auto", cp=8, gpus_per_node=4)
    rows = plan_rows(cfg, 8, hf_of(cfg), fixed=dict(dp=1, tp=1, pp=1, cp=8))
    assert rows[0].layout.strategy_label() == "hybrid u4xr2 zigzag"
    cfg = config(few, 262144, cp_strategy="auto", cp=8)
    rows = plan_rows(cfg, 8, hf_of(cfg), fixed=dict(dp=1, tp=1, pp=1, cp=8))
    assert rows[0].layout.strategy_label() == "ring r8 zigzag"
    assert not next(r for r in rows if r.layout.strategy == "ulysses").valid


def test_step_time_parts_and_node_boundaries():
    shape = ModelShape.from_hf(hf_of(config(LLAMA_8B, 8192)))
    work = Workload(seq_len=131072, activation_checkpointing="full")
    uly = Layout(1, 1, 1, 16, 16, "zigzag")
    assert group_spans(uly) == {"tp": 1, "ulysses": 16, "ring": 16, "fsdp": 16}
    inside, across = (step_time(shape, uly, work, RATES, gpus_per_node=g) for g in (16, 8))
    assert across.cp_comm > 5 * inside.cp_comm and across.matmul == inside.matmul
    t = step_time(shape, Layout(2, 2, 2, 2, 1, "zigzag"), Workload(seq_len=16384, grad_accum=4), RATES)
    assert t.tp_comm > 0 and t.pp_bubble > 0 and t.fsdp_comm > 0 and t.recompute > 0  # chunked loss
    # 4 sequences in one pipeline pass as 4 microbatches: bubble = (pp-1)/m of the busy time.
    assert t.pp_bubble == pytest.approx((t.total - t.pp_bubble) / 4)
    none = step_time(shape, Layout(8, 1, 1, 1, 1, None), Workload(seq_len=2048), RATES)
    assert none.cp_comm == none.tp_comm == none.pp_bubble == 0


# ---- CLI, calibration, comparison -----------------------------------------------------------------


def test_plan_cli_subprocess():
    env = dict(os.environ, WORLD_SIZE="8")
    proc = subprocess.run(
        [sys.executable, "train.py", "--plan", "--gpus-per-node", "4", "training.seq_len=1024"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "plan for 8 GPUs (4 per node)" in out and "tok/s/GPU" in out
    assert "best: dp" in out and "use it: parallel.dp=" in out
    assert "invalid layouts" in out and "num_key_value_heads=4 is not divisible by tp=8" in out


def test_calibration_and_comparison(tmp_path):
    assert RATES.matmul_tflops == 753 and RATES.attention_rate(128) == 552 and RATES.attention_rate(64) == 445
    assert 445 < RATES.attention_rate(96) < 552 and RATES.attention_rate(256) == 552
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"matmul_tflops": 1}))
    with pytest.raises(ConfigError) as info:
        load_rates(str(bad))
    assert info.value.key == "parallel.plan_calibration" and "lacks" in info.value.reason
    with pytest.raises(ConfigError):
        load_rates(str(tmp_path / "missing.json"))

    table = compare_with_measurements(
        [
            dict(
                layout="dp1 cp8 ulysses",
                pred_mem_gib=40.0,
                meas_mem_gib=42.0,
                pred_step_s=6.0,
                meas_step_s=8.0,
            ),
            dict(layout="dp1 cp8 ring", pred_mem_gib=40.0, meas_mem_gib=None),
        ]
    )
    lines = table.strip().splitlines()
    assert lines[0].startswith("| layout |") and len(lines) == 4
    assert "-5% ok" in lines[2] and "-25% off" in lines[2] and lines[3].count("| - |") >= 2


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU message only")
def test_calibrate_needs_gpu(capsys):
    from parallel.planner.calibrate import main

    assert main(["--out", "unused.json"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_train_calibrate_flag(tmp_path):
    """train.py --calibrate PATH: measures (GPU only) into a new file, never over an existing one."""

    def run(path):
        cmd = [sys.executable, "train.py", "--config", "configs/demo.yaml", "--calibrate", str(path)]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)

    existing = tmp_path / "calib.json"
    existing.write_text("{}")
    res = run(existing)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert "--calibrate" in res.stderr and "exists" in res.stderr and existing.read_text() == "{}"
    res = run(tmp_path / "missing" / "calib.json")
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = run(tmp_path / "new.json")  # this CPU machine: the measurement itself needs a GPU
    assert res.returncode == 1 and "needs a CUDA GPU" in res.stdout and not (tmp_path / "new.json").exists()


def _ulysses_rate(rank, world):
    import torch

    from parallel.planner.calibrate import measure_ulysses_rate

    return measure_ulysses_rate(
        torch.device("cpu"), tokens=256, heads=8, kv_heads=2, head_dim=16, dtype=torch.float32
    )


def test_calibrate_times_the_real_ulysses_exchange():
    """The all-to-all rate the planner uses is measured on the exchange Ulysses runs, with the volume
    formula the cost model divides by it (one function for both)."""
    import math

    from parallel.planner import cost
    from parallel.planner.calibrate import ulysses_exchange_bytes
    from tests.dist import run_distributed

    assert ulysses_exchange_bytes is cost.ulysses_exchange_bytes
    # q (8 heads) + k, v (2 each) out and the output (8) back, half of it to the other rank, fp32.
    assert ulysses_exchange_bytes(256, 8, 2, 16, 2, 4) == 4 * 256 * 20 * 16 / 2
    rates = run_distributed(_ulysses_rate, 2)
    assert all(math.isfinite(r) and r > 0 for r in rates)


def test_norm_bytes_follow_the_norm_in_use():
    from parallel.planner.memory import norm_bytes

    b, h = 2, SMALL.hidden
    lean = norm_bytes(SMALL, Layout(1, 2, 1, 2, 1, "zigzag"), Workload(seq_len=64))
    hf = norm_bytes(SMALL, Layout(1, 2, 1, 2, 1, "zigzag"), Workload(seq_len=64, sequence_parallel=True))
    assert (lean, hf) == (b * h + 4, (4 + b) * h)  # HF's norm (fp32 upcast kept) stays under TP + SP


def test_memory_switches_in_the_model():
    """activation_offload, ac_group and mlp_chunks move the predicted activations the way the code does."""
    shape = ModelShape.from_hf(hf_of(config(LLAMA_8B, 8192)))
    lay = Layout(1, 1, 1, 2, 1, "zigzag")

    def act(**kw):
        return memory_breakdown(
            shape, lay, Workload(seq_len=262144, activation_checkpointing="full", **kw)
        ).activations

    tokens, h, layers = 262144 // 2, shape.hidden, shape.layers
    inputs = 2 * h * tokens
    base = act()
    # groups of 4: 8 group inputs kept instead of 32 layer inputs, 3 rebuilt ones in backward
    assert base - act(ac_group=4) == (layers - layers // 4 - 3) * inputs
    # offload: no saved inputs on the GPU, the one being back-propagated comes back
    assert base - act(activation_offload=True) == (layers - 1) * inputs
    assert act(mlp_chunks=8) < base
    # bf16 ring accumulators: out/dQ and dK/dV at 2 instead of 4 bytes per element
    attn = {
        acc: memory_breakdown(shape, lay, Workload(seq_len=262144, cp_accum=acc)).attention
        for acc in ("float32", "input")
    }
    a_r, k_r, d = shape.heads, shape.kv_heads, shape.head_dim
    assert attn["float32"] - attn["input"] == tokens * 2 * (a_r * d + 2 * k_r * d + 2 * k_r * d)


def test_compile_in_the_model():
    """parallel.compile: the fused SiLU x up saves one [tokens, intermediate] tensor less per layer, the fused
    loss chunk holds one fp32 tensor instead of three, and the layers' and loss' memory-bound work shrinks to
    COMPILED_ELEMENTWISE of it (the optimizer's does not); the config key reaches the planner."""
    from parallel.planner.cost import COMPILED_ELEMENTWISE

    shape = ModelShape.from_hf(hf_of(config(LLAMA_8B, 8192)))
    lay = Layout(1, 1, 1, 2, 1, "zigzag")
    eager = Workload(seq_len=65536, activation_checkpointing="none")
    fused = dataclasses.replace(eager, compiled=True)
    m0, m1 = memory_breakdown(shape, lay, eager), memory_breakdown(shape, lay, fused)
    tokens, inter = 65536 // 2, shape.intermediate
    # every layer's saved activations (none checkpointed) plus the working layer lose 2 bytes x I per token
    assert m0.activations - m1.activations == (shape.layers + 1) * 2 * inter * tokens
    assert (m0.mlp_working - m1.mlp_working, m0.mlp_grads - m1.mlp_grads) == (2 * inter * tokens,) * 2
    assert (m0.logits, m1.logits) == (4096 * shape.vocab * (2 + 12), 4096 * shape.vocab * (2 + 4))
    t0, t1 = step_time(shape, lay, eager, RATES), step_time(shape, lay, fused, RATES)
    adamw = (
        28 * (shape.layers * shape.layer_params() + shape.root_params(1)) / 2 / (RATES.elementwise_gbps * 1e9)
    )
    assert t1.memory_bound - adamw == pytest.approx(COMPILED_ELEMENTWISE * (t0.memory_bound - adamw))
    assert (t1.matmul, t1.attention) == (t0.matmul, t0.attention)
    cfg = Config(model=ModelConfig(config=LLAMA_8B), parallel=ParallelConfig(compile=True))
    assert Workload.from_config(cfg).compiled


def test_lora_in_the_model():
    """LoRA: the frozen base costs b bytes per parameter (no fp32 master, gradient or AdamW state), the
    adapters 16; no unsharded base gradient is gathered; the base matmuls lose their weight gradients; TP
    layouts are invalid. The adapter count is checked against peft's own model."""
    import peft
    from transformers import AutoModelForCausalLM

    from parallel.planner.lora import adapter_layer_params

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    tiny = hf(heads=4, kv=2, layers=2, head_dim=8)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_config(tiny), peft.LoraConfig(r=3, target_modules=list(targets))
    )
    n_peft = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert adapter_layer_params(ModelShape.from_hf(tiny), 3, targets) * 2 == n_peft
    assert adapter_layer_params(ModelShape.from_hf(tiny), 3, ("q_proj", "v_proj")) * 2 < n_peft

    shape = ModelShape.from_hf(hf_of(config(LLAMA_8B, 8192)))
    assert (
        shape.layers * adapter_layer_params(shape, 16, targets) == 41_943_040
    )  # Llama-3-8B, r=16, all linears
    lay = Layout(2, 1, 1, 2, 1, "zigzag")
    full = Workload(seq_len=131072, activation_checkpointing="full")
    lora = dataclasses.replace(full, lora_rank=16, lora_targets=targets)
    m_full, m_lora = memory_breakdown(shape, lay, full), memory_breakdown(shape, lay, lora)
    base = -(-(shape.layers * shape.layer_params() + shape.root_params(1)) // 4)
    adapters = -(-(shape.layers * adapter_layer_params(shape, 16, targets)) // 4)
    assert (m_full.params, m_full.grads, m_full.optimizer) == (4 * base, 4 * base, 8 * base)
    assert (m_lora.params, m_lora.grads, m_lora.optimizer) == (
        2 * base + 4 * adapters,
        4 * adapters,
        8 * adapters,
    )
    assert m_lora.total < m_full.total - 10 * base  # (grads may hide under the saved activations)
    t_full, t_lora = step_time(shape, lay, full, RATES), step_time(shape, lay, lora, RATES)
    p_mm = shape.layers * shape.layer_matmul_params() + shape.vocab * shape.hidden
    want = (4 * p_mm + 6 * shape.layers * adapter_layer_params(shape, 16, targets)) / (6 * p_mm)
    assert t_lora.matmul / t_full.matmul == pytest.approx(want)
    assert t_lora.attention == t_full.attention and t_lora.total < t_full.total

    cfg = config(LLAMA_8B, 65536)
    cfg.lora.r = 16
    rows = plan_rows(cfg, 4, hf_of(cfg))
    assert rows[0].fits and all(r.layout.tp == 1 for r in rows if r.valid)
    assert any("LoRA" in r.reason for r in rows if not r.valid)
    assert Workload.from_config(cfg).lora_rank == 16
