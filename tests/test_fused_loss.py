"""training.loss_impl=fused: the same loss and gradients (hidden, LM-head weight and bias) as the chunked
loss and as plain full-logit cross-entropy in float64, with ignored labels, a ragged tail chunk and a
loss scale on the way back; liger-kernel (CUDA) is checked in tests/test_gpu_fp8.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.fused_loss import fused_cross_entropy_sum
from models.loss import chunked_cross_entropy_sum


def _case(dtype, seed, b=2, s=37, d=24, v=101, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    head = torch.nn.Linear(d, v, bias=bias, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=gen) * 0.3)
        if bias:
            head.bias.copy_(torch.randn(v, generator=gen))
    labels = torch.randint(0, v, (b, s), generator=gen)
    labels[0, :5] = -100  # a masked prompt
    labels[1, -1] = -100
    return hidden, head, labels


def _loss_and_grads(fn, hidden, head, labels, scale=0.37):
    params = [hidden, head.weight] + ([head.bias] if head.bias is not None else [])
    loss = fn(hidden, head, labels) * scale
    return loss.detach(), torch.autograd.grad(loss, params)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _reference(hidden, head, labels):
    logits = F.linear(
        hidden.double(), head.weight.double(), None if head.bias is None else head.bias.double()
    )
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk,bias", [(16, True), (7, False), (4096, True)])
def test_fused_equals_reference_float64(chunk, bias):
    seed = int(torch.randint(0, 2**31, ()).item())
    hidden, head, labels = _case(torch.float64, seed, bias=bias)
    ref_loss, ref_grads = _loss_and_grads(_reference, hidden, head, labels)
    for fn in (
        lambda h, m, y: fused_cross_entropy_sum(h, m, y, chunk),
        lambda h, m, y: chunked_cross_entropy_sum(h, m, y, chunk),
    ):
        loss, grads = _loss_and_grads(fn, hidden, head, labels)
        assert _rel(loss, ref_loss) < 1e-12, seed
        for g, r in zip(grads, ref_grads):
            assert _rel(g, r) < 1e-12, seed


@pytest.mark.parametrize("dtype,tol,loss_tol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 1e-3)])
def test_fused_matches_chunked(dtype, tol, loss_tol):
    """In the training dtypes the two agree to the dtype's rounding (the fused path accumulates the grad
    weight chunk by chunk in the weight's dtype, as autograd does for the chunked one)."""
    seed = int(torch.randint(0, 2**31, ()).item())
    hidden, head, labels = _case(dtype, seed, s=70, d=32)
    chunked = _loss_and_grads(lambda h, m, y: chunked_cross_entropy_sum(h, m, y, 32), hidden, head, labels)
    fused = _loss_and_grads(lambda h, m, y: fused_cross_entropy_sum(h, m, y, 32), hidden, head, labels)
    ref = _loss_and_grads(_reference, hidden, head, labels)
    assert _rel(fused[0], ref[0]) < loss_tol and _rel(fused[0], chunked[0]) < loss_tol, seed
    for f, c, r in zip(fused[1], chunked[1], ref[1]):
        assert _rel(f, c) < tol and _rel(f, r) < tol, (seed, _rel(f, c), _rel(f, r))


def test_fused_without_grad_and_frozen_head():
    hidden, head, labels = _case(torch.float64, 3)
    with torch.no_grad():
        loss = fused_cross_entropy_sum(hidden, head, labels, 16)
    assert _rel(loss, _reference(hidden, head, labels)) < 1e-12
    head.requires_grad_(False)  # LoRA: a frozen LM head still passes the gradient to the hidden states
    (g,) = torch.autograd.grad(fused_cross_entropy_sum(hidden, head, labels, 16), [hidden])
    (r,) = torch.autograd.grad(_reference(hidden, head, labels), [hidden])
    assert _rel(g, r) < 1e-12


def test_fused_compiled_matches_eager():
    hidden, head, labels = _case(torch.float32, 5, s=64, d=32)
    eager = _loss_and_grads(lambda h, m, y: fused_cross_entropy_sum(h, m, y, 32), hidden, head, labels)
    compiled = _loss_and_grads(
        lambda h, m, y: fused_cross_entropy_sum(h, m, y, 32, compiled=True), hidden, head, labels
    )
    assert _rel(compiled[0], eager[0]) < 1e-5
    for c, e in zip(compiled[1], eager[1]):
        assert _rel(c, e) < 1e-5
