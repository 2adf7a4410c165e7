"""Every model family trains on GPUs: bf16, the fused attention kernels, NCCL, the family's own TP plan.

    torchrun --nproc_per_node 2 -m bench.families --out $OUT/families.json

For each family a random-init model of one shape (hidden 1024, 4 layers, 16 heads, 4 kv heads, 32k tokens of
the shipped corpus per step, packed with document masks) trains 3 steps through the real trainer under
cp=2 ring and under tp=2 (the same global batch: dp=1 both; on one GPU: the single-GPU layout only), plus a Llama run with YaRN and one with dynamic
NTK RoPE overrides on a saved model. Reports the step-1 loss of both layouts and their relative difference
(bf16: expect ~1e-3, not 1e-6), the last loss, tokens/s/GPU and peak memory. CPU smoke run:
`torchrun --nproc_per_node 2 -m bench.families --device cpu --seq 256 --hidden 64`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

from bench.common import gpu_name, markdown_table, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shapes(hidden: int) -> dict[str, dict]:
    base = dict(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=1 << 20,
        tie_word_embeddings=False,
    )
    return {
        "llama": dict(base, model_type="llama"),
        "qwen3": dict(base, model_type="qwen3", head_dim=128, use_sliding_window=False),
        "olmo2": dict(base, model_type="olmo2"),
        "granite": dict(
            base,
            model_type="granite",
            embedding_multiplier=12.0,
            logits_scaling=8.0,
            residual_multiplier=0.22,
            attention_multiplier=0.0078125,
        ),
        "phi3": dict(base, model_type="phi3", pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0),
        # transformers' Ministral needs head_dim set (None fails); its sliding window covers the sequence
        "ministral": dict(base, model_type="ministral", head_dim=hidden // 16, sliding_window=1 << 20),
        "qwen3_moe": dict(
            base,
            model_type="qwen3_moe",
            head_dim=64,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=hidden // 2,
            use_sliding_window=False,
        ),
    }


def _common(args, out_dir: str) -> list[str]:
    return [
        f"model.tokenizer={ROOT}/configs/demo/tokenizer",
        f"data.path={ROOT}/configs/demo/corpus.jsonl",
        f"data.cache_dir={out_dir}/cache",
        f"model.dtype={'bfloat16' if args.device == 'cuda' else 'float32'}",
        f"training.device={args.device}",
        f"training.seq_len={args.seq}",
        "training.micro_batch_size=1",
        f"training.steps={args.steps}",
        "parallel.activation_checkpointing=full",
        "checkpoint.export_hf=false",
        "checkpoint.resume=none",
        "logging.progress=false",
    ]


def run_case(args, overrides: list[str], out_dir: str) -> dict:
    from trainer.config import load_config
    from trainer.trainer import Trainer

    try:
        trainer = Trainer(load_config(None, [*_common(args, out_dir), *overrides, f"output_dir={out_dir}"]))
        trainer.train()
    except Exception as exc:  # noqa: BLE001 - one failing family must not hide the others
        why = " ".join(str(exc).split())[:200]
        print(f"[rank {os.environ.get('RANK', '0')}] {out_dir}: {type(exc).__name__}: {why}", file=sys.stderr)
        return {"error": why}
    h = trainer.history
    times = [r["step_time_s"] for r in h[1:]] or [h[0]["step_time_s"]]
    world = dist.get_world_size()
    return {
        "loss1": h[0]["loss"],
        "loss_last": h[-1]["loss"],
        "tok_s_gpu": h[0]["tokens"] / (sum(times) / len(times)) / world,
        "peak_gib": max((r["peak_mem_gib"] or 0.0) for r in h),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    # One directory for all ranks (the data cache is written by rank 0 and read by the others).
    tmp = os.path.join(tempfile.gettempdir(), f"bench_families_{os.environ.get('MASTER_PORT', '0')}")
    rows = []
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ring = ["parallel.cp=2", "parallel.cp_strategy=ring"] if world > 1 else ["parallel.cp=1"]
    for name, fields in shapes(args.hidden).items():
        inline = [f"model.config={json.dumps(fields)}"]
        cp = run_case(args, [*inline, *ring], f"{tmp}/{name}-cp2")
        row = {"family": name, **{f"cp2_{k}": v for k, v in cp.items()}}
        if name != "qwen3_moe" and world > 1:  # Qwen3-MoE: no tensor parallelism (rejected at config time)
            tp = run_case(args, [*inline, "parallel.tp=2"], f"{tmp}/{name}-tp2")
            row.update({f"tp2_{k}": v for k, v in tp.items()})
            if "loss1" in cp and "loss1" in tp:
                row["rel_loss1"] = abs(cp["loss1"] - tp["loss1"]) / cp["loss1"]
        rows.append(row)
        if dist.get_rank() == 0:
            print(json.dumps(row), flush=True)
    # RoPE overrides on a saved model.
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(shapes(args.hidden)["llama"], max_position_embeddings=8192)
    fields.pop("model_type")
    saved = f"{tmp}/pretrained"
    if dist.get_rank() == 0:  # (transformers' save_pretrained writes the config on rank 0 only)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **fields)).save_pretrained(saved)
    dist.barrier()
    ropes = {  # the saved model's window is 8192: YaRN stretches it to the sequence, dynamic NTK rescales
        "llama+yarn": {
            "rope_type": "yarn",
            "factor": max(args.seq / 8192, 2.0),
            "original_max_position_embeddings": 8192,
        },
        "llama+dynamic": {"rope_type": "dynamic", "factor": 2.0},
    }
    for name, rope in ropes.items():
        over = [f"model.path={saved}", f"model.config.rope_parameters={json.dumps(rope)}"]
        cp = run_case(args, [*over, *ring], f"{tmp}/{name}-cp2")
        uly = {}
        if world > 1:
            uly = run_case(
                args, [*over, "parallel.cp=2", "parallel.cp_strategy=ulysses"], f"{tmp}/{name}-uly"
            )
        row = {
            "family": name,
            **{f"cp2_{k}": v for k, v in cp.items()},
            **{f"tp2_{k}": v for k, v in uly.items()},
        }
        if "loss1" in cp and "loss1" in uly:
            row["rel_loss1"] = abs(cp["loss1"] - uly["loss1"]) / cp["loss1"]
        rows.append(row)
    cols = [
        "family",
        "cp2_loss1",
        "tp2_loss1",
        "rel_loss1",
        "cp2_loss_last",
        "cp2_tok_s_gpu",
        "tp2_tok_s_gpu",
        "cp2_peak_gib",
        "tp2_peak_gib",
        "cp2_error",
        "tp2_error",
    ]
    if dist.get_rank() == 0:
        print("(RoPE rows: the second layout is cp=2 ulysses, not tp=2)")
        shown = [
            {k: (f"{v:.2e}" if k == "rel_loss1" else f"{v:.4f}" if "loss" in k else v) for k, v in r.items()}
            for r in rows
        ]
        print(markdown_table(shown, cols))
    meta = {
        "gpu": gpu_name() if args.device == "cuda" else "cpu",
        "seq": args.seq,
        "hidden": args.hidden,
        "steps": args.steps,
        "world": dist.get_world_size(),
    }
    write_results(args.out, rows, meta)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
