"""LM head + cross-entropy implementations (training.loss_impl): forward + backward time and peak memory.

    python -m bench.loss --out $OUT/loss.json                    # one H200, ~3 minutes
    python -m bench.loss --device cpu --shapes tiny --tokens 512  # CPU smoke run

For each shape (hidden, vocab of bench/train.py's models) and token count: bf16 hidden states and LM-head
weight (what FSDP2 hands the loss), the summed loss times a loss scale, backward to both. chunked = the
default (each chunk checkpointed: its logits are projected again in backward), fused = models/fused_loss.py
(gradients in the forward pass: one LM-head matmul fewer), liger = liger-kernel when installed; *-compiled
= the same through torch.compile (what parallel.compile uses). Median of CUDA-event times after warm-up;
`head_tflops` counts the 3 matmuls any implementation must do (6 x tokens x hidden x vocab), so it shows
how close each one gets; `err_*` are relative errors of the loss and gradients against chunked eager.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import (
    describe_error,
    free_memory,
    markdown_table,
    run_meta,
    time_ms,
    write_results,
)

SHAPES = {"1b": (2048, 128256), "3b": (3072, 128256), "8b": (4096, 128256), "tiny": (64, 512)}
IMPLS = ("chunked", "chunked-compiled", "fused", "fused-compiled", "liger")


def loss_fn(impl: str, chunk: int):
    from models.fused_loss import fused_cross_entropy_sum, liger_cross_entropy_sum
    from models.loss import chunked_cross_entropy_sum

    compiled = impl.endswith("-compiled")
    if impl.startswith("chunked"):
        return lambda h, head, y: chunked_cross_entropy_sum(h, head, y, chunk, compiled)
    if impl.startswith("fused"):
        return lambda h, head, y: fused_cross_entropy_sum(h, head, y, chunk, compiled)
    return liger_cross_entropy_sum


def inputs(hidden: int, vocab: int, tokens: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    h = (torch.randn(1, tokens, hidden, device=device, generator=gen) * 0.5).to(dtype).requires_grad_()
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
    torch.nn.init.normal_(head.weight, std=hidden**-0.5, generator=gen)
    labels = torch.randint(0, vocab, (1, tokens), device=device, generator=gen)
    labels[:, : tokens // 20] = -100  # a masked prompt
    return h, head, labels


def measure(shape: str, tokens: int, impl: str, chunk: int, device: torch.device, warmup: int, iters: int):
    from models.fused_loss import liger_missing

    if impl == "liger" and (device.type != "cuda" or liger_missing()):
        return dict(error="liger-kernel not installed (or no CUDA)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden, vocab = SHAPES[shape]
    h, head, labels = inputs(hidden, vocab, tokens, device, dtype)
    fn = loss_fn(impl, chunk)

    def step():
        h.grad = head.weight.grad = None
        (fn(h, head, labels) * 0.5).backward()

    step()
    got = (fn(h, head, labels).detach().double(), h.grad.double(), head.weight.grad.double())
    ref_fn = loss_fn("chunked", chunk)
    h.grad = head.weight.grad = None
    (ref_fn(h, head, labels) * 0.5).backward()
    ref = (ref_fn(h, head, labels).detach().double(), h.grad.double(), head.weight.grad.double())
    errs = [((g - r).norm() / r.norm()).item() for g, r in zip(got, ref)]
    base = 0
    if device.type == "cuda":
        h.grad = head.weight.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    ms = time_ms(step, warmup=warmup, iters=iters, device=device)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else 0.0
    return dict(
        ms=ms,
        head_tflops=6 * tokens * hidden * vocab / (ms / 1e3) / 1e12,
        extra_peak_gib=peak,
        err_loss=errs[0],
        err_grad_h=errs[1],
        err_grad_w=errs[2],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--chunk", type=int, default=4096, help="training.loss_chunk")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        for tokens in args.tokens:
            for impl in args.impls:
                free_memory(device)
                try:
                    row = measure(shape, tokens, impl, args.chunk, device, args.warmup, args.iters)
                except Exception as e:  # an OOM or a missing kernel: keep the rest of the table
                    row = dict(error=describe_error(e))
                rows.append(dict(shape=shape, tokens=tokens, impl=impl, **row))
                print(rows[-1], flush=True)
    meta = run_meta(args, device)
    write_results(args.out, rows, meta)
    print(f"\n{meta['gpu']}, torch {meta['torch']}")
    cols = ["shape", "tokens", "impl", "ms", "head_tflops", "extra_peak_gib", "err_grad_w", "error"]
    for r in rows:
        r["err_grad_w"] = f"{r['err_grad_w']:.1e}" if "err_grad_w" in r else ""
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
