"""CP attention on 2 GPUs (NCCL, bf16) against one GPU doing the whole sequence: outputs and dq/dk/dv.

The pytest test launches `torchrun --nproc_per_node 2 -m tests.test_gpu_cp`; each rank computes the
float64 reference for the full sequence itself and compares its own shard. Skipped below 2 GPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
    ),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 2e-2


def test_cp_attention_two_gpus():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tests.test_gpu_cp"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(res.stdout[-6000:], res.stderr[-6000:])
    assert res.returncode == 0, "2-GPU CP check failed (output above)"
    assert "ALL OK" in res.stdout


def _reference(q, k, v, dout, causal, doc_ids):
    """float64 softmax attention with autograd, on [B, S, H, D] full tensors (GQA by repetition)."""
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    h, hkv = q.shape[2], k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(h // hkv, 1)
    vh = v.transpose(1, 2).repeat_interleave(h // hkv, 1)
    s = qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5
    n = s.shape[-1]
    allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    out = (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vh).transpose(1, 2)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _worker() -> None:
    import torch.distributed as dist

    from parallel.cp.api import cp_attn_func
    from parallel.cp.sharding import shard

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    group = dist.group.WORLD
    failures = []
    # (strategy, layout, causal, kv_heads, docs)
    cases = [
        ("ring", "zigzag", True, 8, False),
        ("ring", "zigzag", True, 2, False),
        ("ring", "contiguous", True, 8, False),
        ("ring", "zigzag", False, 8, False),
        ("ring", "zigzag", True, 2, True),
        ("ulysses", "zigzag", True, 8, False),
        ("ulysses", "zigzag", True, 2, False),
        ("ulysses", "contiguous", False, 8, False),
        ("ulysses", "zigzag", True, 8, True),
        ("ring", "zigzag", True, 2, "many"),  # short documents: batched kernel calls (parallel/cp/batched.py)
        ("ulysses", "zigzag", True, 8, "many"),
    ]
    b, s, h, d = 1, 4096, 8, 128
    for i, (strategy, layout, causal, hkv, docs) in enumerate(cases):
        gen = torch.Generator(device="cuda").manual_seed(1234 + i)
        q, dout = (torch.randn(b, s, h, d, generator=gen, device="cuda").bfloat16() for _ in range(2))
        k, v = (torch.randn(b, s, hkv, d, generator=gen, device="cuda").bfloat16() for _ in range(2))
        doc_ids = None
        if docs:  # three packed documents with uneven cuts, or ~60 of 1 to 130 tokens
            doc_ids = torch.zeros(b, s, dtype=torch.int64, device="cuda")
            same = torch.Generator().manual_seed(99 + i)  # the same cuts on every rank
            cuts = (
                (700, 2900, 3001) if docs is True else torch.randint(1, 130, (60,), generator=same).cumsum(0)
            )
            for cut in cuts:
                doc_ids[:, int(cut) :] += 1
        ref = _reference(q, k, v, dout, causal, doc_ids)
        loc = [shard(x, world, rank, layout, dim=1).requires_grad_() for x in (q, k, v)]
        groups = dict(ring_group=group) if strategy == "ring" else dict(ulysses_group=group)
        out = cp_attn_func(
            *loc,
            causal=causal,
            layout=layout,
            doc_ids=None if doc_ids is None else shard(doc_ids, world, rank, layout, dim=1),
            **groups,
        )
        out.backward(shard(dout, world, rank, layout, dim=1))
        got = (out, loc[0].grad, loc[1].grad, loc[2].grad)
        errs = []
        for g, r, label in zip(got, ref, ("out", "dq", "dk", "dv")):
            r = shard(r, world, rank, layout, dim=1)
            e = ((g.double() - r).norm() / r.norm()).item()
            errs.append(f"{label} {e:.1e}")
            if not e < TOL:
                failures.append(
                    f"rank {rank} case {i} {strategy}/{layout}/causal={causal}/hkv={hkv}: {label} {e:.2e}"
                )
        if rank == 0:
            print(
                f"case {i} {strategy:7s} {layout:10s} causal={causal!s:5s} hkv={hkv} docs={docs!s:5s} "
                + "  ".join(errs),
                flush=True,
            )
    bad = torch.tensor([len(failures)], device="cuda")
    dist.all_reduce(bad)
    for f in failures:
        print("FAIL", f, flush=True)
    if rank == 0 and bad.item() == 0:
        print("ALL OK", flush=True)
    dist.destroy_process_group()
    sys.exit(1 if bad.item() else 0)


if __name__ == "__main__":
    _worker()
