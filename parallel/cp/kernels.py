"""Local (single-device) attention kernels that return the log-sum-exp, with matching backwards.

Every CP strategy is built from these: a kernel attends one block of queries to one block of keys and
returns `(out, lse)`; the CP layer merges blocks by log-sum-exp and later calls `backward` with the
*merged* output and lse, which is what makes per-block gradients exact (the softmax normaliser is global).

Layout: q [B, H, Sq, D], k/v [B, Hkv, Sk, D] with H % Hkv == 0 (GQA/MQA); out [B, H, Sq, D] in q's dtype;
lse [B, H, Sq] float32. `causal=True` means the top-left aligned lower triangle (Sq == Sk): the caller only
asks for it on diagonal blocks. A query row that sees no key gets out = 0 and lse = -inf.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def _expand_kv(k: Tensor, heads: int) -> Tensor:
    """Repeat kv heads so each query head has its own copy (GQA on kernels that lack it)."""
    groups = heads // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def _reduce_kv_grad(dk: Tensor, kv_heads: int) -> Tensor:
    """Sum the gradients of the repeated kv heads back onto the original heads."""
    b, h, s, d = dk.shape
    return dk if h == kv_heads else dk.view(b, kv_heads, h // kv_heads, s, d).sum(dim=2)


# ---------------------------------------------------------------------------------------------
# math: explicit softmax in the input dtype (float64 is the test reference), works everywhere.
# ---------------------------------------------------------------------------------------------
def _math_scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    s = torch.matmul(q, _expand_kv(k, q.shape[1]).transpose(-1, -2)) * scale
    if causal:
        sq, sk = s.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
    return s


def math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    s = _math_scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)  # rows with no key: -inf - -inf
    out = torch.matmul(p, _expand_kv(v, q.shape[1]))
    return out, lse.to(torch.promote_types(lse.dtype, torch.float32))


def math_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    heads, kv_heads = q.shape[1], k.shape[1]
    ke, ve = _expand_kv(k, heads), _expand_kv(v, heads)
    s = _math_scores(q, k, causal, scale)
    p = torch.exp(s - lse.to(s.dtype).unsqueeze(-1)).nan_to_num(0.0)
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, ve.transpose(-1, -2))
    # D = rowsum(dO * O) uses the merged output: the softmax normaliser spans every block.
    delta = (dout * out).sum(dim=-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, ke) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    return dq, _reduce_kv_grad(dk, kv_heads), _reduce_kv_grad(dv, kv_heads)


# ---------------------------------------------------------------------------------------------
# cpu_flash: aten's tiled CPU flash kernel (returns lse natively).
# ---------------------------------------------------------------------------------------------
def cpu_flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    h = q.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, _expand_kv(k, h), _expand_kv(v, h), 0.0, causal, scale=scale
    )
    return out, lse.float()


def cpu_flash_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    h, hkv = q.shape[1], k.shape[1]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(),
        q,
        _expand_kv(k, h),
        _expand_kv(v, h),
        out.contiguous(),
        lse.contiguous(),
        0.0,
        causal,
        scale=scale,
    )
    return dq, _reduce_kv_grad(dk, hkv), _reduce_kv_grad(dv, hkv)


# ---------------------------------------------------------------------------------------------
# flash: aten's CUDA flash-attention-2 op (SDPA's flash backend).
# ---------------------------------------------------------------------------------------------
def flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    h, sq = q.shape[1], q.shape[2]
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q, _expand_kv(k, h), _expand_kv(v, h), 0.0, causal, False, scale=scale
    )
    # Some builds pad lse to a multiple of the tile; the CP merge needs exactly [B, H, Sq].
    return res[0], res[1][..., :sq].float()


def flash_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    h, hkv = q.shape[1], k.shape[1]
    sq, sk = q.shape[2], k.shape[2]
    # cum_seq must be *undefined* (None), not empty: a defined tensor selects the varlen kernel.
    # The philox state is only read with dropout > 0.
    philox = torch.empty((), dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout,
        q,
        _expand_kv(k, h),
        _expand_kv(v, h),
        out,
        lse.float().contiguous(),
        None,
        None,
        sq,
        sk,
        0.0,
        causal,
        philox,
        philox,
        scale=scale,
    )
    return dq, _reduce_kv_grad(dk, hkv), _reduce_kv_grad(dv, hkv)


# ---------------------------------------------------------------------------------------------
# cudnn: aten's cuDNN fused attention (fastest on Hopper with torch >= 2.5).
# ---------------------------------------------------------------------------------------------
def _cudnn_rejects(q: Tensor, k: Tensor) -> bool:
    # cuDNN refuses single-token blocks ("s_q = s_kv = 1 is not supported"); packed documents produce
    # them. Such blocks cost nothing, so the flash op takes them (same out/lse contract, either backward).
    return q.shape[2] == 1 or k.shape[2] == 1


def _cudnn_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, expand: bool):
    b, h, sq = q.shape[:3]
    if expand:
        k, v = _expand_kv(k, h), _expand_kv(v, h)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale
    )
    # cuDNN returns lse as [B, H, Sq, 1] (strided like the output on some versions): reshape, not view.
    return res[0], res[1].reshape(b, h, sq).float()


def _cudnn_backward(dout, q, k, v, out, lse, causal: bool, scale: float, expand: bool):
    h, hkv = q.shape[1], k.shape[1]
    sq, sk = q.shape[2], k.shape[2]
    if expand:
        k, v = _expand_kv(k, h), _expand_kv(v, h)
    philox = torch.zeros((), dtype=torch.int64, device=q.device)  # read only with dropout > 0
    # attn_bias and cum_seq must be undefined (None): a defined empty tensor is taken as a bias / varlen.
    # cuDNN wants dO laid out like O; both are made contiguous [B, H, S, D] here.
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout.contiguous(),
        q,
        k,
        v,
        out.contiguous(),
        lse.float().unsqueeze(-1).contiguous(),
        philox,
        philox,
        None,
        None,
        None,
        sq,
        sk,
        0.0,
        causal,
        scale=scale,
    )
    return dq, _reduce_kv_grad(dk, hkv), _reduce_kv_grad(dv, hkv)


_NATIVE_GQA: dict[int, bool] = {}


def cudnn_native_gqa(device: torch.device) -> bool:
    """Whether cuDNN attention takes fewer K/V heads than query heads, forward and backward, on this
    device - else every call expands K and V to all query heads (copies of 2 x 4 GiB per call at 512k keys
    and 8B's head counts, and dK/dV as large before their reduction). Decided once per device against the
    expanded call on a small problem, so a build without the support (or with a wrong result) falls back."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NATIVE_GQA:
        gen = torch.Generator(device=device).manual_seed(0)
        q, dout = (torch.randn(1, 4, 256, 64, generator=gen, device=device).bfloat16() for _ in range(2))
        k, v = (torch.randn(1, 2, 256, 64, generator=gen, device=device).bfloat16() for _ in range(2))
        results = []
        try:
            for expand in (False, True):
                out, lse = _cudnn_forward(q, k, v, True, 0.125, expand)
                results.append((out, lse, *_cudnn_backward(dout, q, k, v, out, lse, True, 0.125, expand)))
            _NATIVE_GQA[index] = all(
                a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)
                for a, b in zip(*results)
            )
        except RuntimeError:
            _NATIVE_GQA[index] = False
    return _NATIVE_GQA[index]


def set_cudnn_gqa(device: torch.device, native: bool | None) -> None:
    """Override that decision (benchmarks comparing the two ways; tests); None probes again."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if native is None:
        _NATIVE_GQA.pop(index, None)
    else:
        _NATIVE_GQA[index] = native


def cudnn_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    if _cudnn_rejects(q, k):
        return flash_forward(q, k, v, causal, scale)
    expand = k.shape[1] != q.shape[1] and not cudnn_native_gqa(q.device)
    return _cudnn_forward(q, k, v, causal, scale, expand)


def cudnn_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    if _cudnn_rejects(q, k):
        return flash_backward(dout, q, k, v, out, lse, causal, scale)
    expand = k.shape[1] != q.shape[1] and not cudnn_native_gqa(q.device)
    return _cudnn_backward(dout, q, k, v, out, lse, causal, scale, expand)


# ---------------------------------------------------------------------------------------------
# flash_attn: the flash-attn package, when installed (layout [B, S, H, D]; handles GQA itself).
# ---------------------------------------------------------------------------------------------
def _flash_attn_module():
    import flash_attn.flash_attn_interface as fai  # optional extra: pip install longctx[flash]

    return fai


def flash_attn_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    fai = _flash_attn_module()
    out, lse, _ = fai.flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, scale, causal, return_attn_probs=True
    )
    return out.transpose(1, 2), lse.float()


def flash_attn_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    fai = _flash_attn_module()
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
    # The private backward takes the merged out/lse; its argument list is stable across 2.6-2.8.
    fai._flash_attn_backward(
        dout.transpose(1, 2).contiguous(),
        qt,
        kt,
        vt,
        out.transpose(1, 2).contiguous(),
        lse.contiguous(),
        dq,
        dk,
        dv,
        0.0,
        scale,
        causal,
        -1,
        -1,
        0.0,
        None,
        False,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Registry and selection
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    name: str
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    device: str  # "cpu", "cuda" or "any"


KERNELS: dict[str, Kernel] = {
    "math": Kernel("math", math_forward, math_backward, "any"),
    "cpu_flash": Kernel("cpu_flash", cpu_flash_forward, cpu_flash_backward, "cpu"),
    "flash": Kernel("flash", flash_forward, flash_backward, "cuda"),
    "cudnn": Kernel("cudnn", cudnn_forward, cudnn_backward, "cuda"),
    "flash_attn": Kernel("flash_attn", flash_attn_forward, flash_attn_backward, "cuda"),
}


def flash_attn_available() -> bool:
    try:
        _flash_attn_module()
    except ImportError:
        return False
    return True


def _cudnn_preferred(device: torch.device) -> bool:
    # cuDNN fused attention is the fastest kernel on Hopper and later (with a cuDNN >= 9 build); on Ampere
    # it runs but the flash kernels are the established choice (torch's own SDPA order), so auto takes those.
    if not torch.backends.cudnn.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 9 and (torch.backends.cudnn.version() or 0) >= 90000


def select_kernel(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Kernel:
    """Resolve a kernel name ("auto" picks the fastest that supports device, dtype and head_dim)."""
    if name != "auto":
        if name not in KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; choose from auto, {', '.join(KERNELS)}")
        kernel = KERNELS[name]
        if kernel.device not in ("any", device.type):
            raise ValueError(f"attention kernel {name!r} runs on {kernel.device}, not {device.type}")
        if name == "flash_attn" and not flash_attn_available():
            raise ValueError(
                "attention kernel 'flash_attn' needs the flash-attn package (pip install longctx[flash])"
            )
        return kernel
    if device.type == "cuda":
        half = dtype in (torch.float16, torch.bfloat16)
        if half and head_dim <= 128 and head_dim % 8 == 0 and _cudnn_preferred(device):
            return KERNELS["cudnn"]
        if half and head_dim <= 256 and head_dim % 8 == 0:
            return KERNELS["flash_attn"] if flash_attn_available() else KERNELS["flash"]
        return KERNELS["math"]
    if dtype == torch.float64:
        return KERNELS["math"]
    return KERNELS["cpu_flash"]


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
