"""End-to-end training-step throughput: longctx (FSDP2 + CP) vs a hand-built HF + torch-native-CP peer.

    torchrun --nproc_per_node 2 -m bench.train --model 1b --seqs 32768 65536 131072 --impls ring ulysses peer

    torchrun --nproc_per_node 2 -m bench.train --model tiny --device cpu --seqs 256   # CPU smoke run

Random-init Llama-3.x-shaped models (fp32 masters, bf16 compute via FSDP2 mixed precision), full activation
checkpointing, random token batches (no data pipeline) through the trainer's own step (trainer/step.py:
global token count, AdamW, grad clipping, non-finite check). Reports
tokens/s/GPU, MFU (trainer/metrics.flops_per_token convention, 989 TF/s bf16 peak) and peak memory.
The peer is what HF accelerate's cp_size does underneath: LlamaForCausalLM (SDPA) + fully_shard + torch
`context_parallel` (cuDNN SDPA), HF gradient checkpointing, full logits.
--breakdown times one more step by part (bench/meter.py: attention kernels, loss, optimizer, the rest);
--profile appends that step's top GPU kernels (torch.profiler) to a file.
"""

from __future__ import annotations

import argparse
import itertools
import time

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
    sync,
    write_results,
)
from bench.meter import parts_table, step_meter

PEAK_BF16 = 989e12
_LLAMA = dict(
    model_type="llama",
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=1 << 21,
    rms_norm_eps=1e-5,
    attention_dropout=0.0,
    bos_token_id=128000,
    eos_token_id=128001,
)
MODELS = {
    "1b": dict(
        _LLAMA,
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=8192,
        tie_word_embeddings=True,
    ),
    "3b": dict(
        _LLAMA,
        hidden_size=3072,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=8192,
        tie_word_embeddings=True,
    ),
    "tiny": dict(  # CPU smoke runs of the benches themselves (tests/test_bench_train.py, test_bench_engines.py)
        _LLAMA,
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=False,
    ),
    "8b": dict(
        _LLAMA,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        tie_word_embeddings=False,
    ),
}


def make_config(
    model: str, seq: int, strategy: str, cp: int, ac: str = "full", offload: bool = False, overrides=None
):
    """The bench's Config, built and checked as the trainer builds a run's; `overrides` maps dotted keys
    ("parallel.mlp_chunks", "model.config.num_hidden_layers") to values, applied last."""
    from trainer.config import build_config

    raw = {
        "model": {"config": dict(MODELS[model]), "dtype": "bfloat16"},  # FSDP casts the fp32 masters
        "parallel": {
            "cp": cp,
            "cp_strategy": strategy,
            "activation_checkpointing": ac,
            "fsdp_cpu_offload": offload,
        },
        "training": {"seq_len": seq},
        "data": {"doc_mask": False},  # one document per sequence: plain causal attention
    }
    return build_config(raw, overrides)


def parse_variant(text: str) -> tuple[str, dict]:
    """'label:key=value,key=value' -> (label, {key: value}); values parsed as YAML scalars."""
    import yaml

    label, _, body = text.partition(":")
    pairs = [kv.split("=", 1) for kv in body.split(",") if kv.strip()]
    return label.strip(), {k.strip(): yaml.safe_load(v) for k, v in pairs}


def build_stage(cfg, device: torch.device, kind=None):
    """The trainer's model, unsharded: HF model (as `kind` builds it, a trainer/training_kind.py kind; default
    full fine-tuning in fp32) -> CausalLMStage (the engine shards it)."""
    from models.causal_lm import CausalLMStage
    from trainer.training_kind import FullTraining

    # Random init straight on the device: same as the trainer's CPU build + .to(device), but an 8B
    # init on the CPU takes minutes.
    with torch.device(device):
        hf = (kind or FullTraining()).build_hf(cfg.model, cfg.training.seed)
    stage = CausalLMStage(hf, loss_chunk=cfg.training.loss_chunk, loss_impl=cfg.training.loss_impl)
    del hf
    stage.doc_mask = cfg.data.doc_mask
    return stage


class EngineRow:
    """One engine of the trainer (trainer/engine.py: FSDP2 or DeepSpeed, per parallel.engine) around the
    trainer's model, stepped exactly as training steps it (no pipeline)."""

    def __init__(self, cfg, mesh, dims, device: torch.device, kind=None) -> None:
        from models.parallelize import parallelize_llama
        from trainer.engine import EngineContext, build_engine

        self.engine = build_engine(
            cfg, build_stage(cfg, device, kind), EngineContext(mesh, dims, device, parallelize_llama)
        )
        self.optimizer = self.engine.optimizer

    def step(self, batches: list[dict[str, torch.Tensor]], step: int) -> float:
        return self.engine.step(batches, step, 0).loss

    def close(self) -> None:
        self.engine.close()
        self.engine = self.optimizer = None


def longctx_step_fn(cfg, world: int, device: torch.device):
    """One training step of the FSDP2 row on random tokens, the same on every rank of the CP group."""
    from parallel.dims import ParallelDims

    dims = ParallelDims.from_config(cfg.parallel, world)
    row = EngineRow(cfg, dims.build_mesh(device.type), dims, device)
    counter = itertools.count()

    def step():
        i = next(counter)
        row.step(random_batches(cfg, i), i)

    step.optimizer = row.optimizer  # for StepMeter
    return step


def _peer_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain causal SDPA for the peer: HF's own mask logic may build a mask under torch CP (non-monotonic
    position ids look like packed documents), which no fused kernel accepts. kv heads are repeated as HF does
    (cuDNN SDPA has no GQA path)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def peer_step_fn(cfg, world: int):
    """HF LlamaForCausalLM + FSDP2 + torch context_parallel (cuDNN SDPA) + HF checkpointing, full logits."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("peer_sdpa", _peer_sdpa)
    AttentionMaskInterface.register("peer_sdpa", lambda *a, **k: None)
    fields = dict(cfg.model.config)
    hf_cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32, attn_implementation="peer_sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
    model.config.use_cache = False
    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    seq = cfg.training.seq_len
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step():
        ids = torch.randint(0, hf_cfg.vocab_size, (1, seq + 1), device="cuda", generator=gen)
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        pos = torch.arange(seq, device="cuda")[None].contiguous()
        with (
            sdpa_kernel(SDPBackend.CUDNN_ATTENTION),
            context_parallel(mesh, buffers=[x, y, pos], buffer_seq_dims=[1, 1, 1]),
        ):
            logits = model(input_ids=x, position_ids=pos).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.optimizer = opt  # for StepMeter
    return step


def run_steps(step, warmup: int, steps: int, device: torch.device) -> float:
    """Median seconds per step (host clock after a device sync; steps are seconds long)."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return max_over_ranks(sorted(times)[len(times) // 2])


def measure(
    model: str,
    seq: int,
    impl: str,
    world: int,
    rank: int,
    warmup: int,
    steps: int,
    offload: bool = False,
    ac: str = "full",
    overrides: dict | None = None,
    profile: str | None = None,
    device: torch.device | None = None,
    breakdown: bool = False,
) -> dict:
    from transformers import AutoConfig

    from trainer.metrics import flops_per_token

    strategy = "ring" if impl == "peer" else impl
    cfg = make_config(model, seq, strategy, cp=world, ac=ac, offload=offload, overrides=overrides)
    fields = dict(cfg.model.config)
    hf_cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    device = device or local_device()
    if device.type == "cpu":
        cfg.model.dtype = "float32"  # the CPU kernels' dtype (smoke runs of the bench)
    if impl == "peer":
        step = peer_step_fn(cfg, world)
    else:
        step = longctx_step_fn(cfg, world, device)
    meter = step_meter(device, step.optimizer)
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    try:
        t = run_steps(step, warmup, steps, device)
        kernel_calls = meter.calls["attn_fwd"] // max(warmup + steps, 1)
        peak = max_over_ranks(torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0)
        parts = meter.timed_step(step) if breakdown else None
        if profile:
            profile_step(step, profile, f"{model} {impl} seq={seq} ac={ac}")
    finally:
        meter.restore()
    tok_gpu = seq / world / t
    extra = {"breakdown": parts} if parts else {}
    return dict(
        model=model,
        impl=impl,
        seq=seq,
        ac=ac if impl != "peer" else "full",
        step_s=t,
        tok_s_gpu=tok_gpu,
        mfu_pct=100 * tok_gpu * flops_per_token(hf_cfg, seq) / PEAK_BF16,
        peak_gib=peak,
        attn_fwd_calls_per_step=kernel_calls,
        **extra,
    )


def profile_step(step, path: str, title: str) -> None:
    """One more step under torch.profiler; rank 0 appends to `path` its kernel time by part of the step
    (bench/meter.parts_table) and the top GPU kernels by total time."""
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    try:
        # GPU: device activity only (CPU-side op recording raised inside cuDNN attention calls, torch 2.11)
        with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
            step()
            if gpu:
                torch.cuda.synchronize()
        events = prof.key_averages()
        own = "self_device_time_total" if gpu else "self_cpu_time_total"
        table = parts_table({e.key: getattr(e, own) for e in events}) + "\n"
        table += events.table(sort_by=own, row_limit=40, max_name_column_width=70)
    except Exception as e:  # noqa: BLE001 - a profiler failure must not cost the row its timings
        table = f"profile failed: {describe_error(e)}\n"
    if dist.get_rank() == 0:
        with open(path, "a") as f:
            f.write(f"\n## {title}\n{table}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["1b"], choices=sorted(MODELS))
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument(
        "--layers",
        type=int,
        default=None,
        help="override num_hidden_layers (a shallower model of the same shape)",
    )
    ap.add_argument("--impls", nargs="+", default=["ring", "ulysses", "peer"])
    ap.add_argument(
        "--peer-seqs", type=int, nargs="*", default=None, help="seq lens for the peer (default all)"
    )
    ap.add_argument("--ac", nargs="+", default=["full"], help="activation checkpointing modes (longctx rows)")
    ap.add_argument(
        "--variant",
        action="append",
        default=None,
        help="'label:key=value,...' config overrides (e.g. 'offload:parallel.activation_offload=true'); repeat",
    )
    ap.add_argument(
        "--profile", default=None, help="file: profile one extra step per row, append the top GPU ops"
    )
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="time one extra step per row by part (attention kernels, loss, optimizer, the rest)",
    )
    ap.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo smoke run (--model tiny)"
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rank, world = init_dist(args.device)
    device = local_device(args.device)
    variants = [parse_variant(v) for v in args.variant or ["base:"]]
    if args.layers:
        variants = [
            (f"{label}-L{args.layers}", {**o, "model.config.num_hidden_layers": args.layers})
            for label, o in variants
        ]
    rows = []
    for model in args.model:
        for seq in args.seqs:
            runs = [
                (i, a, v)
                for i in args.impls
                for a in (["full"] if i == "peer" else args.ac)
                for v in (variants[:1] if i == "peer" else variants)
            ]
            for impl, ac, (label, overrides) in runs:
                if impl == "peer" and args.peer_seqs is not None and seq not in args.peer_seqs:
                    continue
                free_memory(device)
                try:
                    row = measure(
                        model,
                        seq,
                        impl,
                        world,
                        rank,
                        args.warmup,
                        args.steps,
                        ac=ac,
                        overrides=overrides,
                        profile=args.profile,
                        device=device,
                        breakdown=args.breakdown,
                    )
                except Exception as e:  # an OOM or any failure: keep the rest of the table
                    row = dict(model=model, impl=impl, seq=seq, ac=ac, error=describe_error(e))
                row["variant"] = "peer" if impl == "peer" else label
                rows.append(row)
                log0(row)
                free_memory(device)
    meta = run_meta(args, device, world=world, ac=args.ac, dtype="bf16 compute, fp32 master")
    write_results(args.out, rows, meta)
    log0(f"\n{meta['gpu']} x{world}, torch {meta['torch']}")
    log0(
        markdown_table(
            rows,
            [
                "model",
                "impl",
                "seq",
                "ac",
                "variant",
                "step_s",
                "tok_s_gpu",
                "mfu_pct",
                "peak_gib",
                "attn_fwd_calls_per_step",
                "error",
            ],
        )
    )
    if dist.is_initialized():  # (a run without torchrun has no process group)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
