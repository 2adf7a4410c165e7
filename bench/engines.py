"""FSDP2 + CPU offload vs DeepSpeed ZeRO-3 + CPU offload: tokens/s per GPU and peak GPU memory, one run.

    torchrun --nproc_per_node 2 -m bench.engines --model 8b --seqs 65536 131072 --out engines.json
    torchrun --nproc_per_node 2 -m bench.engines --tiny --device cpu --seqs 256 512    # CPU smoke test

For each sequence length, each engine row builds the model afresh (random init), trains --warmup + --steps
optimizer steps on random tokens, reports its numbers and is torn down before the next row, so an OOM
costs one row, not the table. Rows (the default is the first two):

  fsdp2_offload          parallel.fsdp_cpu_offload: fp32 params, grads and AdamW live and step on the CPU
  ds_z3_offload          ZeRO-3, offload_params=cpu + offload_optimizer=cpu, torch AdamW on the CPU
  ds_z3_offload_cpuadam  the same with DeepSpeedCPUAdam (JIT-built on first use: needs a C++ compiler)

Layout for all: CP = all ranks (zigzag; ring unless --strategy ulysses), full activation checkpointing,
fp32 master weights with bf16 compute, AdamW + clipping at 1.0. Both engines are the trainer's own
(trainer/engine.py, built and stepped by bench.train's `EngineRow` as `Trainer` builds and steps them) on
the trainer's batch dicts (input_ids, labels, position_ids, doc_ids). The model shapes and build, the base
config (`make_config`) and the MFU convention are bench.train's too.

Columns: step_s (median step, slowest rank), tok_s_gpu, mfu_pct (989 TF/s bf16), peak_gib
(max_memory_allocated over warm-up + timed steps, max over ranks), init_peak_gib (building and sharding
the model), resident_gib (allocated after the last step), host_rss_gib (resident host memory per rank at
the end of the row, max over ranks), loss (first step; equal init and tokens, so the engines should
agree to bf16 rounding). --budget-s skips a row that would not end inside it (estimated from the
previous rows, scaled by the length), and the JSON is rewritten after every row, so an outer `timeout`
keeps the rows already measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time

import torch
import torch.distributed as dist

from bench.common import (
    describe_error,
    free_memory,
    log0,
    markdown_table,
    max_over_ranks,
    random_batches,
    sync,
    write_results,
)

ENGINES: dict[str, dict[str, object]] = {
    "fsdp2_offload": {"parallel.engine": "fsdp2", "parallel.fsdp_cpu_offload": True},
    "ds_z3_offload": {
        "parallel.engine": "deepspeed",
        "deepspeed.zero_stage": 3,
        "deepspeed.offload_params": "cpu",
        "deepspeed.offload_optimizer": "cpu",
        "deepspeed.cpu_adam": False,  # torch AdamW, as the fsdp2 row: no C++ build, same optimizer code
    },
    "ds_z3_offload_cpuadam": {
        "parallel.engine": "deepspeed",
        "deepspeed.zero_stage": 3,
        "deepspeed.offload_params": "cpu",
        "deepspeed.offload_optimizer": "cpu",
        "deepspeed.cpu_adam": True,
    },
}
DEFAULT_ENGINES = ["fsdp2_offload", "ds_z3_offload"]
COLUMNS = [
    "engine",
    "seq",
    "step_s",
    "tok_s_gpu",
    "mfu_pct",
    "peak_gib",
    "init_peak_gib",
    "resident_gib",
    "host_rss_gib",
    "build_s",
    "loss",
    "error",
]


# ---- configuration ----------------------------------------------------------------------------------
def engine_config(opts, engine: str, seq: int, world: int, device: torch.device):
    """bench.train's config for the model (CP = world, full AC) plus the engine's keys, validated."""
    from bench.train import make_config

    overrides: dict[str, object] = {
        "training.device": device.type,
        "training.micro_batch_size": 1,
        "training.grad_accum": 1,
        "output_dir": opts.workdir,
        **ENGINES[engine],
    }
    if opts.ds_config and overrides["parallel.engine"] == "deepspeed":
        overrides["deepspeed.config"] = opts.ds_config  # merged with the derived values, as in training
    if device.type == "cpu":
        overrides["model.dtype"] = "float32"  # the CPU attention path of the tests; bf16 is the GPU setting
    cfg = make_config(opts.model, seq, opts.strategy, cp=world, ac="full", overrides=overrides)
    return cfg


# ---- measuring ----------------------------------------------------------------------------------------
def gib_allocated(device: torch.device, peak: bool = False) -> float | None:
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**30


def host_rss_gib() -> float:
    """Resident host memory of this process (offloaded weights and optimizer state live there)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def mfu_pct(cfg, tok_s_gpu: float, device: torch.device) -> float | None:
    from bench.train import PEAK_BF16
    from models.registry import load_hf_config
    from trainer.metrics import flops_per_token

    if device.type != "cuda":
        return None
    hf_config = load_hf_config(None, cfg.model.config)
    return 100 * tok_s_gpu * flops_per_token(hf_config, cfg.training.seq_len) / PEAK_BF16


def measure(engine: str, cfg, mesh, dims, device: torch.device, warmup: int, steps: int) -> dict:
    """Build one engine, run warm-up + timed steps, tear it down; the row's numbers (max over ranks)."""
    world = dist.get_world_size()
    seq = cfg.training.seq_len
    from bench.train import EngineRow

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = None
    try:
        t0 = time.perf_counter()
        row = EngineRow(cfg, mesh, dims, device)
        sync(device)
        build_s = time.perf_counter() - t0
        init_peak = gib_allocated(device, peak=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses, times = [], []
        for i in range(warmup + steps):
            batches = random_batches(cfg, i)  # outside the timer, like the trainer's data time
            dist.barrier()
            t = time.perf_counter()
            losses.append(row.step(batches, i))
            sync(device)
            times.append(time.perf_counter() - t)
        peak, resident, rss = gib_allocated(device, peak=True), gib_allocated(device), host_rss_gib()
    finally:
        if row is not None:
            row.close()
        del row
    times = max_over_ranks(times)  # each step at its slowest rank
    timed = sorted(times[warmup:]) or sorted(times)
    step_s = timed[len(timed) // 2]
    if device.type == "cuda":
        peak, init_peak, resident = max_over_ranks([peak, init_peak, resident])
    build_s, rss = max_over_ranks([build_s, rss])
    tok_s_gpu = seq / world / step_s
    return dict(
        engine=engine,
        seq=seq,
        step_s=step_s,
        tok_s_gpu=tok_s_gpu,
        mfu_pct=mfu_pct(cfg, tok_s_gpu, device),
        peak_gib=peak,
        init_peak_gib=init_peak,
        resident_gib=resident,
        host_rss_gib=rss,
        build_s=build_s,
        loss=losses[0],
        losses=losses,
        step_times=times,
    )


def run_row(opts, engine: str, seq: int, mesh, dims, device: torch.device) -> dict:
    """One row; an OOM or other failure becomes the row's `error` instead of ending the table."""
    try:
        cfg = engine_config(opts, engine, seq, dist.get_world_size(), device)
        row = measure(engine, cfg, mesh, dims, device, opts.warmup, opts.steps)
    except Exception as exc:  # noqa: BLE001 - an OOM or any failure: keep the rest of the table
        row = dict(engine=engine, seq=seq, error=describe_error(exc))
    free_memory(device)  # after the except block: the traceback no longer holds the row's tensors
    row["model"] = opts.model
    return row


def over_budget(
    start: float, budget_s: float | None, rows: list[dict], engine: str, seq: int, device
) -> bool:
    """Whether this row would end past --budget-s. Its time is guessed from the same engine's last row
    (or, for an engine's first row, the last row of any engine), scaled by seq / that row's seq: the
    build, the step's linear parts and the CPU optimizer do not grow that fast, so this errs long.
    Rank 0's clock decides for all ranks (they must skip the same rows)."""
    done = [r for r in rows if "wall_s" in r]
    ref = ([r for r in done if r["engine"] == engine] or done or [None])[-1]
    estimate = ref["wall_s"] * seq / ref["seq"] if ref else 0.0
    late = budget_s is not None and time.perf_counter() - start + estimate > budget_s
    flag = torch.tensor([float(late)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def summarize(rows: list[dict], engines: list[str], gpu_total_gib: float | None) -> dict:
    """Per engine: the longest sequence that trained here, and a linear estimate of the longest that
    would fit the card (peak memory above the resident state taken as proportional to the length; the
    fixed per-step buffers in it make the estimate err short). Labelled as an estimate, never measured."""
    out = {}
    for engine in engines:
        ok = sorted((r for r in rows if r["engine"] == engine and "error" not in r), key=lambda r: r["seq"])
        entry: dict[str, object] = {"longest_ok": ok[-1]["seq"] if ok else None}
        if ok and gpu_total_gib and ok[-1]["peak_gib"] is not None:
            limit = gpu_total_gib - 2.0  # allocator fragmentation and the CUDA context
            if len(ok) >= 2:  # two points: slope from the two longest
                (s0, m0), (s1, m1) = [(r["seq"], r["peak_gib"]) for r in ok[-2:]]
                slope = (m1 - m0) / (s1 - s0)
            else:  # one point: the line through the resident state
                s1, m1 = ok[-1]["seq"], ok[-1]["peak_gib"]
                slope = (m1 - ok[-1]["resident_gib"]) / s1
            if slope > 0:
                entry["linear_estimate"] = int(s1 + (limit - m1) / slope)
        out[engine] = entry
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of a run (bench.max_context builds its deepspeed probes' options here too)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="8b", help="a bench.train MODELS key")
    ap.add_argument(
        "--tiny", action="store_true", help="--model tiny: a 2-layer, 64-wide Llama (CPU smoke test)"
    )
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--strategy", default="ring", choices=["ring", "ulysses"], help="CP over all ranks")
    ap.add_argument("--seqs", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--engines", nargs="+", default=DEFAULT_ENGINES, choices=sorted(ENGINES))
    ap.add_argument(
        "--ds-config", default=None, help="deepspeed.config for the deepspeed rows (e.g. pin_memory, buckets)"
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip rows that would end later than this many seconds after the start (imports not counted)",
    )
    ap.add_argument("--workdir", default=None, help="output_dir for the rows (nothing is saved there)")
    ap.add_argument("--out", default=None)
    opts = ap.parse_args(argv)
    if opts.tiny:
        opts.model = "tiny"
    opts.workdir = opts.workdir or os.path.join(tempfile.gettempdir(), "longctx-bench-engines")
    return opts


def setup(opts: argparse.Namespace):
    """Device and the trainer's process group, and the one mesh every row uses (all engines
    share the dp x cp layout: cp = world). Returns (device, mesh, dims)."""
    from bench.train import make_config
    from parallel.dims import ParallelDims
    from trainer.distributed import init_distributed, pick_device

    device = pick_device(opts.device)  # also sets expandable_segments, as the trainer does
    init_distributed(device)
    world = dist.get_world_size()
    pcfg = make_config(opts.model, max(opts.seqs), opts.strategy, cp=world).parallel
    dims = ParallelDims.from_config(pcfg, world)
    return device, dims.build_mesh(device.type), dims


def main() -> None:
    opts = parse_args()
    start = time.perf_counter()
    device, mesh, dims = setup(opts)
    world = dist.get_world_size()
    gpu_total = (
        torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    )
    meta = dict(
        date=datetime.date.today().isoformat(),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        gpu_total_gib=gpu_total,
        world=world,
        torch=torch.__version__,
        omp_threads=torch.get_num_threads(),
        args=vars(opts),
        layout=f"cp={world} {opts.strategy}, full activation checkpointing, fp32 master weights, "
        + ("bf16 compute" if device.type == "cuda" else "fp32 compute"),
    )
    log0(f"bench.engines: {meta}")
    rows: list[dict] = []
    for seq in sorted(opts.seqs):
        for engine in opts.engines:
            if over_budget(start, opts.budget_s, rows, engine, seq, device):
                row = dict(
                    engine=engine, seq=seq, error=f"skipped: would end past --budget-s {opts.budget_s}"
                )
            else:
                t0 = time.perf_counter()
                row = run_row(opts, engine, seq, mesh, dims, device)
                row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            log0({k: v for k, v in row.items() if k not in ("losses", "step_times")})
            meta["summary"] = summarize(rows, opts.engines, gpu_total)
            write_results(opts.out, rows, meta)  # after every row: an outer timeout keeps what was measured
    log0(f"\n{meta['gpu']} x{world}, torch {meta['torch']}, {meta['omp_threads']} CPU threads per rank")
    log0(markdown_table(rows, COLUMNS))
    log0(f"longest trained here / linear estimate: {meta['summary']}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
