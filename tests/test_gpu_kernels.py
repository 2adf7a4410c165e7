"""CUDA attention kernels (cuDNN, flash) against the float64 math kernel: (out, lse) and (dq, dk, dv).

The backward is checked the way CP uses it: given the kernel's *own* out/lse, so a wrong lse layout or a
mis-passed argument to the aten backward shows up as a gradient error. Skipped without CUDA.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import parallel.cp.kernels as kernels
from parallel.cp.kernels import KERNELS, default_scale, math_backward, math_forward, select_kernel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# (batch, heads, kv_heads, sq, sk, head_dim, causal)
SHAPES = [
    (2, 8, 8, 256, 256, 64, True),
    (2, 8, 2, 256, 256, 128, True),  # GQA
    (1, 4, 4, 200, 200, 128, True),  # not a multiple of the tile
    (2, 8, 8, 128, 384, 64, False),  # Sq != Sk
    (1, 8, 2, 384, 128, 128, False),  # GQA, Sq > Sk
    (1, 4, 2, 1, 1, 64, True),  # single-token block (packed documents): cuDNN hands it to flash
    (1, 4, 2, 1, 64, 64, False),
]
DTYPES = [torch.bfloat16, torch.float16]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(b, h, hkv, sq, sk, d, dtype, gen, strided: bool):
    """Random q/k/v/dout; `strided` hands in sequence slices of bigger tensors, as the ring does."""

    def rnd(heads, s):
        pad = 64 if strided else 0
        x = torch.randn(b, heads, s + pad, d, generator=gen, device="cuda").to(dtype)
        return x[:, :, pad // 2 : pad // 2 + s]

    return rnd(h, sq), rnd(hkv, sk), rnd(hkv, sk), rnd(h, sq)


@pytest.mark.parametrize(
    "name,dtype,shape,strided",
    [
        (n, dt, sh, st)
        for (n, dt, sh), st in itertools.product(
            itertools.product(["cudnn", "flash"], DTYPES, SHAPES), [False]
        )
    ]
    + [("cudnn", torch.bfloat16, SHAPES[1], True), ("flash", torch.bfloat16, SHAPES[1], True)],
)
def test_kernel_matches_float64(name, dtype, shape, strided):
    kernel = KERNELS[name]
    _check_against_float64(name, kernel.forward, kernel.backward, dtype, shape, strided)


@pytest.mark.parametrize("expand", [False, True])
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[2] < s[1] and s[3] > 1 and s[4] > 1])
def test_cudnn_gqa_native_and_expanded(shape, expand):
    """Both ways of running GQA through cuDNN (K/V heads as they are, or expanded to the query heads)."""
    if not expand and not kernels.cudnn_native_gqa(torch.device("cuda")):
        pytest.skip("this torch/cuDNN build does not take fewer K/V heads (kernels expand them)")

    def fwd(q, k, v, causal, scale):
        return kernels._cudnn_forward(q, k, v, causal, scale, expand)

    def bwd(dout, q, k, v, out, lse, causal, scale):
        return kernels._cudnn_backward(dout, q, k, v, out, lse, causal, scale, expand)

    _check_against_float64(f"cudnn expand={expand}", fwd, bwd, torch.bfloat16, shape, strided=True)


def _check_against_float64(name, forward, backward, dtype, shape, strided):
    b, h, hkv, sq, sk, d, causal = shape
    gen = torch.Generator(device="cuda").manual_seed(hash((name, str(dtype), shape)) % 2**31)
    q, k, v, dout = _inputs(b, h, hkv, sq, sk, d, dtype, gen, strided)
    scale = default_scale(d)

    out, lse = forward(q, k, v, causal, scale)
    ref_out, ref_lse = math_forward(q.double(), k.double(), v.double(), causal, scale)
    assert out.shape == (b, h, sq, d) and out.dtype == dtype
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel(out, ref_out) < 1e-2, f"{name} out rel err {rel(out, ref_out):.2e}"
    assert (lse.double() - ref_lse).abs().max().item() < 2e-3, f"{name} lse off"

    dq, dk, dv = backward(dout, q, k, v, out, lse, causal, scale)
    ref = math_backward(
        dout.double(), q.double(), k.double(), v.double(), out.double(), lse.double(), causal, scale
    )
    for got, want, label in zip((dq, dk, dv), ref, ("dq", "dk", "dv")):
        assert got.shape == want.shape, f"{name} {label} shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert torch.isfinite(got).all(), f"{name} {label} not finite"
        # A one-key causal block has dq = 0 exactly: rounding noise there is judged absolutely.
        err = rel(got, want) if want.abs().max() > 1e-6 else (got.double() - want).abs().max().item()
        assert err < 2e-2, f"{name} {label} err {err:.2e}"


def test_select_kernel_on_cuda():
    dev = torch.device("cuda")
    assert select_kernel("auto", dev, torch.bfloat16, 128).name in ("cudnn", "flash", "flash_attn")
    assert select_kernel("auto", dev, torch.float32, 128).name == "math"
    assert select_kernel("auto", dev, torch.bfloat16, 512).name == "math"
