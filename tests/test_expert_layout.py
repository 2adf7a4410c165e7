"""Qwen3-MoE checkpoints fill the fused expert parameters: per-expert (the hub's and `save_pretrained`'s
layout) and fused (longctx's HF export) checkpoints give exactly transformers' `from_pretrained` weights,
any block of a fused parameter reads the right rows, and a missing expert tensor is named in one line.
Single process (the sharded loads at dp x cp are in tests/test_loading.py and tests/test_families.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch

MOE = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("moe")
    seed = int(torch.randint(0, 2**30, ()))
    print(f"model seed {seed}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **MOE))
    dirs = {"hub": str(root / "hub"), "fused": str(root / "fused"), "broken": str(root / "broken")}
    model.save_pretrained(dirs["hub"])
    from safetensors import safe_open

    with safe_open(os.path.join(dirs["hub"], "model.safetensors"), "pt") as f:
        hub = {k: f.get_tensor(k) for k in f.keys()}
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in hub  # save_pretrained writes per expert
    assert not any(k.endswith("gate_up_proj") for k in hub)
    for name, sd in (
        ("fused", {k: v.contiguous() for k, v in model.state_dict().items()}),
        ("broken", {k: v for k, v in hub.items() if k != "model.layers.1.mlp.experts.2.up_proj.weight"}),
    ):
        os.makedirs(dirs[name])
        save_file(sd, os.path.join(dirs[name], "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(dirs[name], "config.json"), "w") as f:
            json.dump(json.load(open(os.path.join(dirs["hub"], "config.json"))), f)
    return dirs


def _reference(model_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {n: p.detach() for n, p in hf.named_parameters()}


def _longctx_load(model_dir: str) -> dict[str, torch.Tensor]:
    from models.families import expert_layout
    from models.meta_build import build_meta_model
    from models.registry import load_hf_config
    from models.safetensors_io import SafetensorsCheckpoint
    from parallel.load import CheckpointFill, fill_stage, materialize

    config = load_hf_config(model_dir, None)
    model = build_meta_model(config)
    materialize(model, torch.device("cpu"))
    fill_stage(model, CheckpointFill(SafetensorsCheckpoint(model_dir), False, expert_layout(config)))
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_checkpoint_layouts_load_as_from_pretrained(saved, layout):
    ref, got = _reference(saved["hub"]), _longctx_load(saved[layout])
    assert got.keys() == ref.keys()
    for name, value in ref.items():
        assert torch.equal(got[name], value), name
    # the fused layout (longctx's own export) also loads in transformers, to the same weights
    for name, value in _reference(saved["fused"]).items():
        assert torch.equal(ref[name], value), name


def test_any_block_reads_its_rows(saved):
    from models.expert_layout import QWEN3_MOE, expert_requests
    from models.safetensors_io import SafetensorsCheckpoint

    ref = _reference(saved["hub"])
    ckpt = SafetensorsCheckpoint(saved["hub"])
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**30, ())))
    for spec in QWEN3_MOE:
        full = ref[f"model.layers.1.mlp.experts.{spec.name}"]
        blocks = [((1, 0, 0), (2, *full.shape[1:])), ((3, 0, 0), (0, *full.shape[1:]))]  # FSDP-like shards
        for _ in range(20):  # and blocks cut anywhere in every dim (across the gate / up boundary)
            lo = [int(torch.randint(0, d, (), generator=gen)) for d in full.shape]
            size = [int(torch.randint(1, d - o + 1, (), generator=gen)) for o, d in zip(lo, full.shape)]
            blocks.append((tuple(lo), tuple(size)))
        for offsets, size in blocks:
            local = torch.full(size, float("nan"))
            ckpt.read_many(expert_requests("model.layers.1.mlp.experts", spec, full.shape, offsets, local))
            want = full[tuple(slice(o, o + s) for o, s in zip(offsets, size))]
            assert torch.equal(local, want), (spec.name, offsets, size)


def test_missing_expert_tensor_named(saved):
    with pytest.raises(ValueError) as info:
        _longctx_load(saved["broken"])
    message = str(info.value)
    assert "\n" not in message and "model.layers.1.mlp.experts.2.up_proj.weight" in message, message
