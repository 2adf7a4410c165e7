"""Attention throughput: longctx CP (ring zigzag, Ulysses) vs the single-GPU kernel vs torch native CP.

    torchrun --nproc_per_node 2 -m bench.attention --seqs 65536 131072 --kv-heads 32 8 --out $OUT/attention.json

TFLOP/s per GPU, causal: fwd = 4 * S^2 * H * D / 2 / world over the *total* sequence S, fwd+bwd = 3.5x fwd.
The single-GPU row runs the same kernel on one rank's causal block (S / world tokens, its own FLOPs), which
is the efficiency a perfect CP implementation would keep. Median of --iters runs after warm-up (CUDA events),
slowest rank. --profile prints the top CUDA kernels of one ring and one Ulysses fwd+bwd.
"""

from __future__ import annotations

import argparse
import datetime
import gc

import torch
import torch.distributed as dist
import torch.nn.functional as F

import parallel.cp.kernels as kernels
from bench.common import gpu_name, init_dist, log0, markdown_table, max_over_ranks, time_ms, write_results
from parallel.cp.api import build_context, cp_attn_func
from parallel.cp.kernels import default_scale, select_kernel


def causal_flops(s: int, h: int, d: int) -> float:
    return 4.0 * s * s * h * d / 2


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def bench_single(s_local, h, hkv, d, kernel_name, iters):
    """The local kernel alone, called directly (no autograd), on one rank's block."""
    kernel = select_kernel(kernel_name, torch.device("cuda"), torch.bfloat16, d)
    q, dout = (torch.randn(1, h, s_local, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(1, hkv, s_local, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scale = default_scale(d)

    def fwd():
        return kernel.forward(q, k, v, True, scale)

    def fwdbwd():
        out, lse = kernel.forward(q, k, v, True, scale)
        kernel.backward(dout, q, k, v, out, lse, True, scale)

    return kernel.name, time_ms(fwd, iters=iters), time_ms(fwdbwd, iters=iters), causal_flops(s_local, h, d)


def bench_longctx(strategy, s, h, hkv, d, kernel_name, world, iters, profile=False):
    group = dist.group.WORLD
    groups = dict(ring_group=group) if strategy == "ring" else dict(ulysses_group=group)
    ctx = build_context(s, layout="zigzag", kernel=kernel_name, **groups)
    sl = s // world
    q = torch.randn(1, sl, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(1, sl, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2)
    )
    g = torch.randn(1, sl, h, d, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            return cp_attn_func(q, k, v, context=ctx)

    def fwdbwd():
        cp_attn_func(q, k, v, context=ctx).backward(g)

    tf, tfb = time_ms(fwd, iters=iters), time_ms(fwdbwd, iters=iters)
    if profile:
        print_profile(f"{strategy} S={s} hkv={hkv}", fwdbwd)
    return tf, tfb, causal_flops(s, h, d) / world


def bench_torch_cp(s, h, hkv, d, world, rotate, iters):
    """torch.distributed.tensor.experimental.context_parallel around cuDNN SDPA (kv expanded for GQA)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        from torch.distributed.tensor.experimental._attention import set_rotate_method
    except ImportError:
        from torch.distributed.tensor.experimental._context_parallel._attention import set_rotate_method

    set_rotate_method(rotate)
    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with (
        sdpa_kernel(SDPBackend.CUDNN_ATTENTION),
        context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]),
    ):
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        g = torch.randn_like(ql)

        def fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(ql, kl, vl, is_causal=True)

        def fwdbwd():
            F.scaled_dot_product_attention(ql, kl, vl, is_causal=True).backward(g)

        tf, tfb = time_ms(fwd, iters=iters), time_ms(fwdbwd, iters=iters)
    return tf, tfb, causal_flops(s, h, d) / world


def print_profile(label: str, fn, top: int = 14) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    if dist.get_rank() == 0:
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70)
        print(f"--- profile: {label} (rank 0, one fwd+bwd) ---\n{table}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--impls", nargs="+", default=["single", "ring", "ulysses", "torch_cp"])
    ap.add_argument("--rotate", nargs="+", default=["allgather", "alltoall"], help="torch CP rotate methods")
    ap.add_argument(
        "--gqa",
        nargs="+",
        default=["auto"],
        choices=["auto", "native", "expand"],
        help="cuDNN with fewer K/V heads: as probed (auto), forced native, or K/V expanded per call",
    )
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rank, world = init_dist()
    h, d = args.heads, args.head_dim
    rows = []
    runs = [
        (s, hkv, g) for s in args.seqs for hkv in args.kv_heads for g in args.gqa if hkv != h or g == "auto"
    ]
    for s, hkv, gqa in runs:
        native = None if gqa == "auto" else gqa == "native"  # (auto: as probed)
        kernels.set_cudnn_gqa(torch.device("cuda", torch.cuda.current_device()), native)
        base = None
        for impl in args.impls:
            variants = args.rotate if impl == "torch_cp" else [None]
            for rot in variants:
                if impl == "torch_cp" and hkv != h and rot != args.rotate[0]:
                    continue
                _free()
                row = dict(impl=impl if rot is None else f"torch_cp/{rot}", S=s, heads=h, kv_heads=hkv)
                if gqa != "auto":
                    row["impl"] += f" gqa={gqa}"
                try:
                    if impl == "single":
                        name, tf, tfb, fl = bench_single(s // world, h, hkv, d, args.kernel, args.iters)
                        row.update(impl=row["impl"].replace("single", f"single/{name}"), S_local=s // world)
                    elif impl in ("ring", "ulysses"):
                        prof = args.profile and s == args.seqs[0] and hkv == args.kv_heads[0]
                        tf, tfb, fl = bench_longctx(impl, s, h, hkv, d, args.kernel, world, args.iters, prof)
                    else:
                        tf, tfb, fl = bench_torch_cp(s, h, hkv, d, world, rot, args.iters)
                except Exception as e:  # one failing variant must not lose the rest of the table
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    log0(f"{row['impl']} S={s} hkv={hkv} FAILED {row['error']}")
                    rows.append(row)
                    continue
                row.update(
                    fwd_ms=tf,
                    fwd_tflops=fl / tf / 1e9,
                    fwdbwd_ms=tfb,
                    fwdbwd_tflops=3.5 * fl / tfb / 1e9,
                    peak_gib=max_over_ranks(torch.cuda.max_memory_allocated() / 2**30),
                )
                if impl == "single":
                    base = row
                if base is not None and impl != "single":
                    row["fwd_pct_single"] = 100 * row["fwd_tflops"] / base["fwd_tflops"]
                    row["fwdbwd_pct_single"] = 100 * row["fwdbwd_tflops"] / base["fwdbwd_tflops"]
                rows.append(row)
                log0(
                    f"{row['impl']:22s} S={s:7d} hkv={hkv:2d} fwd {tf:8.2f} ms {row['fwd_tflops']:6.1f} TF/s  "
                    f"fwd+bwd {tfb:8.2f} ms {row['fwdbwd_tflops']:6.1f} TF/s  peak {row['peak_gib']:.1f} GiB"
                )
    meta = dict(
        date=datetime.date.today().isoformat(),
        gpu=gpu_name(),
        world=world,
        torch=torch.__version__,
        cudnn=torch.backends.cudnn.version(),
        args=vars(args),
    )
    write_results(args.out, rows, meta)
    cols = [
        "impl",
        "S",
        "kv_heads",
        "fwd_ms",
        "fwd_tflops",
        "fwdbwd_ms",
        "fwdbwd_tflops",
        "fwd_pct_single",
        "fwdbwd_pct_single",
        "peak_gib",
        "error",
    ]
    log0(
        f"\n{meta['gpu']} x{world}, torch {meta['torch']}, cuDNN {meta['cudnn']}, heads {h}, head_dim {d}, bf16"
    )
    log0(markdown_table(rows, cols))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
