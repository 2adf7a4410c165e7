"""Measure the planner's device rates on this machine and write a calibration JSON.

    python -m parallel.planner.calibrate --out calib.json                            # 1 GPU: compute rates
    torchrun --nproc-per-node 8 -m parallel.planner.calibrate --out calib.json       # + NCCL bandwidths

One GPU measures bf16 matmul TF/s (8192^3), FP8 matmul TF/s (tensorwise and rowwise `torch._scaled_mm`, on
sm89+; training.fp8's rate) and causal SDPA fwd+bwd TF/s at head_dim 64 and 128 (cuDNN
preferred, FLOPs = 3.5 x 4*S^2*H*D/2) and the device memory. Under torchrun it also measures the effective
all-to-all rate of the exchange Ulysses runs (q/k/v out, the output back, 32k tokens per rank; the raw 1 GiB
all-to-all is recorded beside it), P2P (rank 0 -> 1) and all-reduce bus bandwidth with 1 GiB messages.
Whatever is not measured is copied from the base file (default: the built-in H100 rates) and says so under
"assumptions".
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from parallel.planner.calibration import DEFAULT_CALIBRATION, GIB
from parallel.planner.cost import ulysses_exchange_bytes


def _time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    import time

    import torch

    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # CPU (tests): host clock
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure_compute(seq_len: int = 16384) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul = 2 * n**3 / _time_ms(lambda: a @ b) / 1e9
    attention = {}
    for d in (64, 128):
        h = 4096 // d
        q, k, v = (
            torch.randn(1, h, seq_len, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        grad = torch.randn_like(q)

        def fwd_bwd(q=q, k=k, v=v, grad=grad):
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

        flops = 3.5 * 4 * seq_len**2 * h * d / 2
        attention[str(d)] = round(flops / _time_ms(fwd_bwd) / 1e9, 1)
    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name,
        "memory_gib": round(props.total_memory / GIB, 1),
        "matmul_tflops": round(matmul, 1),
        "attention_tflops": attention,
        **measure_fp8(n),
    }


def measure_fp8(n: int = 8192) -> dict:
    """FP8 GEMM rates (e4m3 operands, bf16 out) through `torch._scaled_mm`, the kernel torchao's
    Float8Linear calls, as training runs it: one forward GEMM with fast accumulation and two backward GEMMs
    without, 3 x 2n^3 FLOPs over their summed time. Tensorwise (one fp32 scale per operand) and rowwise (a
    scale per row of A and per column of B). Empty on GPUs without FP8 tensor cores (before sm89)."""
    import torch

    if torch.cuda.get_device_capability() < (8, 9) or not hasattr(torch, "_scaled_mm"):
        return {}
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    scales = {
        "fp8_matmul_tflops": (torch.ones((), device="cuda"), torch.ones((), device="cuda")),
        "fp8_rowwise_matmul_tflops": (torch.ones(n, 1, device="cuda"), torch.ones(1, n, device="cuda")),
    }
    out = {}
    for key, (sa, sb) in scales.items():
        try:
            ms = sum(
                _time_ms(
                    lambda fast=fast, sa=sa, sb=sb: torch._scaled_mm(
                        a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast
                    )
                )
                for fast in (True, False, False)
            )
        except (RuntimeError, TypeError) as exc:  # e.g. rowwise scaling unsupported by this torch build
            print(f"calibrate: {key} not measured ({' '.join(str(exc).split())[:120]})")
            continue
        out[key] = round(3 * 2 * n**3 / ms / 1e9, 1)
    return out


def measure_ulysses_rate(
    device, tokens: int = 32768, heads: int = 32, kv_heads: int = 8, head_dim: int = 128, dtype=None
) -> float:
    """Effective all-to-all rate (GiB/s) of the exchange Ulysses really runs - q/k/v in one all-to-all
    plus the output's return, with their layout copies - over the whole process group, at `tokens` per
    rank. A single large NCCL all-to-all runs about twice as fast as these strided, smaller exchanges
    (565 vs 154 GiB/s on 2xH100 by profile); the planner needs the rate of the real thing."""
    import torch
    import torch.distributed as dist

    from parallel.cp.ulysses import head_gather, replicate_kv_heads, seq_gather_qkv

    dtype = dtype or torch.bfloat16
    u, group = dist.get_world_size(), dist.group.WORLD
    q = torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype)
    k = replicate_kv_heads(torch.randn(1, kv_heads, tokens, head_dim, device=device, dtype=dtype), u)
    v = torch.randn_like(k)

    def exchange():
        qh, _, _ = seq_gather_qkv(q, k, v, group)
        head_gather(qh, group)  # the attention output has q's shape

    seconds = _time_ms(exchange) / 1e3
    moved = ulysses_exchange_bytes(tokens, heads, max(kv_heads, u), head_dim, u, q.element_size())
    return moved / seconds / GIB


def measure_comm() -> dict:
    """NCCL bandwidths in GiB/s over all ranks of the torchrun job (the caller set up the group): the
    Ulysses exchange's effective rate, all-reduce bus bandwidth and P2P with 1 GiB messages."""
    import torch
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    x = torch.empty(GIB // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    a2a_raw = _time_ms(lambda: dist.all_to_all_single(y, x)) / 1e3
    ar = _time_ms(lambda: dist.all_reduce(x)) / 1e3

    def p2p():
        if rank == 0:
            dist.send(x, 1)
        elif rank == 1:
            dist.recv(y, 0)
        dist.barrier()

    p2p_s = _time_ms(p2p) / 1e3
    return {
        "alltoall_gibps": round(measure_ulysses_rate(torch.device("cuda", torch.cuda.current_device())), 1),
        "alltoall_raw_gibps": round((world - 1) / world / a2a_raw, 1),
        "collective_gibps": round(2 * (world - 1) / world / ar, 1),
        "p2p_gibps": round(1 / p2p_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallel.planner.calibrate", description=__doc__)
    parser.add_argument("--out", required=True, help="calibration JSON to write")
    parser.add_argument("--base", default=DEFAULT_CALIBRATION, help="rates to copy for what is not measured")
    parser.add_argument("--seq-len", type=int, default=16384, help="attention benchmark sequence length")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("calibrate: needs a CUDA GPU (none found); the planner keeps its built-in H100 rates")
        return 1
    with open(args.base, encoding="utf-8") as f:
        out = json.load(f)
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = 0
    if multi:
        import torch.distributed as dist

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
        rank = dist.get_rank()
        out.update(measure_comm())
    out.update(measure_compute(args.seq_len))
    kept = ["internode_gbps", "fp32_speed", "overhead_gib", "elementwise_gbps"]
    if not multi:
        kept += ["alltoall_gibps", "p2p_gibps", "collective_gibps"]
    out["assumptions"] = [f"{k}: copied from {os.path.basename(args.base)}, not measured" for k in kept]
    if "fp8_matmul_tflops" not in out:
        out["assumptions"].append(
            "fp8_matmul_tflops: not measured (no FP8 GPU); the planner assumes 2 x matmul_tflops"
        )
    if rank == 0:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
        print(json.dumps(out, indent=2))
    if multi:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
