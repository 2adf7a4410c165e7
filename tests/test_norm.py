"""LeanRMSNorm computes HF's RMSNorm (same casts) while keeping only the input and 1/rms per row: outputs
bit for bit, input and weight gradients to rounding, vs the transformers module, for fp32/fp64/bf16 inputs
and weights, with row chunks smaller than the input so the chunk seams are exercised."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import models.norm as norm_module
from models.norm import LeanRMSNorm


@pytest.mark.parametrize(
    "dtype, weight_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
)
def test_lean_rmsnorm_matches_hf(monkeypatch, dtype, weight_dtype):
    monkeypatch.setattr(norm_module, "ROWS_PER_CHUNK", 7)
    seed = int(torch.randint(0, 2**30, ()))
    gen = torch.Generator().manual_seed(seed)
    ref = LlamaRMSNorm(64, eps=1e-5)
    ref.weight.data = (1 + 0.1 * torch.randn(64, generator=gen)).to(weight_dtype)
    lean = LeanRMSNorm(ref)
    assert lean.weight is ref.weight
    x = torch.randn(3, 20, 64, generator=gen).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = ref(x1)
    dy = torch.randn(y1.shape, generator=gen).to(y1.dtype)
    y1.backward(dy)
    w1 = ref.weight.grad.clone()
    ref.weight.grad = None
    y2 = lean(x2)
    y2.backward(dy)
    assert y2.dtype == y1.dtype and torch.equal(y1, y2), seed
    for got, want in ((x2.grad, x1.grad), (ref.weight.grad, w1)):
        assert got.dtype == want.dtype, seed
        if got.dtype == torch.bfloat16:
            # The backward's fp32 maths is HF autograd's in another order: after the cast to bf16 an
            # element on a rounding boundary may land one ulp (at most 2^-7 relative) away - few, no further.
            off = (got.float() - want.float()).abs()
            assert (off <= 2**-7 * want.float().abs()).all(), (seed, off.max())
            assert (off > 0).float().mean() < 0.01, (seed, (off > 0).float().mean())
        else:
            assert (got - want).abs().max() <= 1e-6 * want.abs().max(), seed


def test_lean_norms_keep_parameter_names():
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.causal_lm import CausalLMStage
    from models.norm import lean_norms

    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    stage = CausalLMStage(LlamaForCausalLM(cfg))
    before = dict(stage.named_parameters())
    lean_norms(stage)
    after = dict(stage.named_parameters())
    assert list(before) == list(after) and all(before[k] is after[k] for k in before)
    assert isinstance(stage.model.norm, LeanRMSNorm)
    assert all(isinstance(layer.input_layernorm, LeanRMSNorm) for layer in stage.model.layers.values())
