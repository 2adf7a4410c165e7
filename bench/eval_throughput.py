"""Evaluation forward throughput next to the training step's, same model, same run.

    torchrun --nproc_per_node 1 -m bench.eval_throughput --model 1b 8b --seqs 131072 524288 --layers 4 --out $OUT/eval.json
    torchrun --nproc_per_node 2 -m bench.eval_throughput --model tiny --device cpu --seqs 256   # CPU smoke run

For each (model, length) two rows share one random-init model shape (bench.train's shapes and config):
  eval   the evaluation's own forward (trainer/evaluate.py `Evaluator._scores`: CP sharding, no_grad, the
         stage in eval mode, per-token loss + arg-max through the chunked LM head), timed with CUDA events
  train  the trainer's optimizer step (bench.train.measure: full activation checkpointing, AdamW)
Both on random tokens, one document of `seq` tokens, CP = all ranks (ring, zigzag). Reported per GPU:
tokens/s (`seq / world / time`), peak memory, and ratio = eval tok/s / train tok/s. `--layers` runs a
shallower model of the same width (both rows alike, so the ratio keeps its meaning and the 512k rows fit
a few minutes). The JSON is rewritten after every row; an OOM or any failure becomes an error row.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from bench.common import (
    describe_error,
    free_memory,
    init_dist,
    local_device,
    log0,
    markdown_table,
    max_over_ranks,
    random_batches,
    run_meta,
    time_ms,
    write_results,
)
from bench.train import build_stage, make_config, measure


def eval_row(cfg, world: int, device: torch.device, warmup: int, iters: int) -> dict:
    """The evaluation forward of one sequence: tokens/s per GPU and peak memory."""
    from models.parallelize import parallelize_llama
    from parallel.dims import ParallelDims
    from trainer.evaluate import Evaluator

    dims = ParallelDims.from_config(cfg.parallel, world)
    mesh = dims.build_mesh(device.type)
    stage = build_stage(cfg, device)
    parallelize_llama(stage, mesh, dims, cfg)  # as the trainer's --eval-only shards it
    evaluator = Evaluator(cfg, stage, None, mesh, device, None)  # no held-out data, no passkey: forward only
    batch = random_batches(cfg, 0)[0]
    stage.eval()
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()

    def forward():
        with torch.no_grad():
            evaluator._scores(batch)

    ms = time_ms(forward, warmup=warmup, iters=iters, device=device)
    peak = max_over_ranks(torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0)
    seq = cfg.training.seq_len
    return {"eval_s": ms / 1e3, "eval_tok_s_gpu": seq / world / (ms / 1e3), "eval_peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["1b", "8b"])
    ap.add_argument("--seqs", type=int, nargs="+", default=[131072, 524288])
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (same width)")
    ap.add_argument("--mlp-chunks", type=int, default=1, help="parallel.mlp_chunks for both rows")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="timed forwards (eval) and steps (train) per row")
    ap.add_argument("--skip-train", action="store_true", help="eval rows only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rank, world = init_dist(args.device)
    device = local_device(args.device)
    overrides = {"parallel.mlp_chunks": args.mlp_chunks}
    if args.layers:
        overrides["model.config.num_hidden_layers"] = args.layers
    meta = run_meta(args, device, world=world, dtype="bf16 compute, fp32 master")
    rows = []
    for model in args.model:
        for seq in args.seqs:
            cfg = make_config(model, seq, "ring", cp=world, ac="full", overrides=overrides)
            if device.type == "cpu":
                cfg.model.dtype = "float32"
            row = {"model": model, "seq": seq, "layers": cfg.model.config["num_hidden_layers"]}
            free_memory(device)
            try:
                row.update(eval_row(cfg, world, device, args.warmup, args.steps))
            except Exception as e:  # noqa: BLE001 - an OOM costs the row, not the table
                row["eval_error"] = describe_error(e)
            free_memory(device)
            if not args.skip_train:
                try:
                    train = measure(
                        model, seq, "ring", world, rank, args.warmup, args.steps, ac="full",
                        overrides=overrides, device=device,
                    )  # fmt: skip
                    row.update(train_s=train["step_s"], train_tok_s_gpu=train["tok_s_gpu"],
                               train_peak_gib=train["peak_gib"])  # fmt: skip
                except Exception as e:  # noqa: BLE001
                    row["train_error"] = describe_error(e)
                free_memory(device)
            if row.get("eval_tok_s_gpu") and row.get("train_tok_s_gpu"):
                row["ratio"] = row["eval_tok_s_gpu"] / row["train_tok_s_gpu"]
            rows.append(row)
            log0(row)
            write_results(args.out, rows, meta)
    log0(f"\n{meta['gpu']} x{world}, torch {meta['torch']}")
    cols = ["model", "seq", "layers", "eval_tok_s_gpu", "train_tok_s_gpu", "ratio", "eval_peak_gib"]
    log0(markdown_table(rows, cols + ["train_peak_gib", "eval_error", "train_error"]))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
