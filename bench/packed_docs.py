"""Packed short documents: the attention of one sequence with batched causal-square calls vs one call per
document (parallel/cp/batched.py), fwd+bwd, same process, same inputs.

    python -m bench.packed_docs --seqs 8192 32768 --head-dim 64 128
    python -m bench.packed_docs --device cpu --seqs 512 --heads 4 --kv-heads 2 --head-dim 16   # smoke run

Documents of `--min-len`..`--max-len` tokens (uniform) fill the sequence, packed anew every step; one GPU,
no CP (the batching applies to each rank's own causal blocks, so one rank shows it). Reports milliseconds per fwd+bwd for both
ways, the kernel calls per forward, and the largest output difference between them; `*_warm_ms` repeat one
packing, so every call shape has been seen (the difference to `*_ms` is what new shapes cost, e.g. cuDNN's
per-shape graph builds).
"""

from __future__ import annotations

import argparse

import torch

import parallel.cp.ring as ring
from bench.common import markdown_table, run_meta, time_ms, write_results
from bench.meter import StepMeter
from parallel.cp.api import cp_attn_func


def _docs(seq: int, lo: int, hi: int, gen: torch.Generator) -> torch.Tensor:
    lens = torch.randint(lo, hi + 1, (seq // lo + 1,), generator=gen)
    lens = lens[lens.cumsum(0) <= seq]
    if int(lens.sum()) < seq:
        lens = torch.cat([lens, torch.tensor([seq - int(lens.sum())])])
    return torch.repeat_interleave(torch.arange(len(lens)), lens)[None]


def measure(seq, heads, kv_heads, head_dim, lo, hi, device, iters) -> dict:
    gen = torch.Generator().manual_seed(seq + head_dim)
    # A new packing every step, as in training: kernel shapes (and any per-shape planning) are not all warm.
    batches = [_docs(seq, lo, hi, gen).to(device) for _ in range(iters + 1)]
    docs = batches[0]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, seq, heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
    k, v = (
        torch.randn(1, seq, kv_heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
        for _ in "kv"
    )
    grad = torch.randn_like(q)
    row = dict(seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim, documents=int(docs.max()) + 1)
    outs = {}
    saved = dict(ring.BATCHED_SQUARE_ROWS)
    try:
        for label, rows in (("batched", 4096), ("per_document", 0)):
            ring.BATCHED_SQUARE_ROWS[device.type] = rows

            packings = iter(batches)  # the first one warms up (and runs the cuDNN GQA probe)

            def step(packings=packings):
                cp_attn_func(q, k, v, causal=True, doc_ids=next(packings)).backward(grad)

            row[f"{label}_ms"] = time_ms(step, warmup=1, iters=iters, device=device)

            def same_packing():  # every call shape seen before: kernel time without per-shape planning
                cp_attn_func(q, k, v, causal=True, doc_ids=docs).backward(grad)

            row[f"{label}_warm_ms"] = time_ms(same_packing, warmup=1, iters=iters, device=device)
            meter = StepMeter(device)  # counts the attention kernels' forward calls
            meter.patch_kernels()
            try:
                with torch.no_grad():
                    outs[label] = cp_attn_func(q, k, v, causal=True, doc_ids=docs).float()
            finally:
                meter.restore()
            row[f"{label}_calls"] = meter.calls["attn_fwd"]
    finally:
        ring.BATCHED_SQUARE_ROWS.update(saved)
    row["speedup"] = row["per_document_ms"] / row["batched_ms"]
    row["max_out_diff"] = (outs["batched"] - outs["per_document"]).abs().max().item()
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--min-len", type=int, default=20)
    ap.add_argument("--max-len", type=int, default=400)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for s in args.seqs:
        for d in args.head_dim:
            rows.append(
                measure(s, args.heads, args.kv_heads, d, args.min_len, args.max_len, device, args.iters)
            )
            # Per-document calls plan a kernel for every new length: a slow row shows as soon as it ends.
            print(rows[-1], flush=True)
    meta = run_meta(args, device)
    write_results(args.out, rows, meta)
    print(f"{meta['gpu']}, torch {meta['torch']}")
    cols = ["seq", "head_dim", "documents", "batched_ms", "per_document_ms", "speedup", "batched_calls"]
    cols += ["batched_warm_ms", "per_document_warm_ms"]
    print(markdown_table(rows, cols + ["per_document_calls", "max_out_diff"]))


if __name__ == "__main__":
    main()
