"""LoRA vs full fine-tuning on one GPU: step time, tokens/s, peak GPU and host memory, next to the planner.

    torchrun --nproc_per_node 1 -m bench.lora --rows lora:262144 full:98304 --out $OUT/lora_8b.json
    torchrun --nproc_per_node 1 -m bench.lora --rows lora:524288:4 lora:884736:4 --out $OUT/lora_8b_L4.json
    torchrun --nproc_per_node 1 -m bench.lora --rows lora:32768 --set parallel.compile=true \
        --variant bf16: --variant fp8:training.fp8=true --warmup 2 --steps 3 --out $OUT/lora_fp8_8b.json
    torchrun --nproc_per_node 1 -m bench.lora --model tiny --device cpu --rows lora:256 full:256   # smoke

A row is `kind:seq[:layers]`: kind `lora` (lora.r=--rank on the attention and MLP projections, base frozen
in bf16) or `full` (fp32 masters + AdamW), `layers` a shallower model of the same shape (the per-layer proxy
of a full-depth step that would outlast the device's command limit). Every row is the trainer's own build
(trainer/training_kind.py) and step (trainer/step.py) on random tokens, with the memory switches of
--set (default: full checkpointing in groups of 4 layers, their inputs offloaded to the host, MLPs in 8
tiles); each --variant adds its overrides on top, one row per row x variant. Peak host memory is this process's resident set, sampled every 0.2 s during the row. The planner
columns are parallel/planner's prediction for the same row and layout (--device-memory-gib decides `fits`).
--breakdown times one more step by part (bench/meter.py); --profile FILE appends one more step's kernel time
by part and its top GPU kernels (torch.profiler) to FILE.
"""

from __future__ import annotations

import argparse
import threading
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
    write_results,
)
from bench.meter import step_meter
from bench.train import PEAK_BF16, EngineRow, make_config, parse_variant, profile_step, run_steps

SWITCHES = "parallel.ac_group=4,parallel.activation_offload=true,parallel.mlp_chunks=8"
COLUMNS = [
    "kind",
    "variant",
    "seq",
    "layers",
    "step_s",
    "tok_s",
    "mfu_pct",
    "peak_gpu_gib",
    "peak_host_gib",
    "plan_gib",
    "plan_step_s",
    "error",
]


class HostPeak:
    """Largest resident set of this process while the context is open (GiB)."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.peak = every_s, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> HostPeak:
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def row_config(model: str, kind: str, seq: int, layers: int | None, rank: int, switches: dict):
    overrides = {"lora.r": rank if kind == "lora" else 0, **switches}
    if layers:
        overrides["model.config.num_hidden_layers"] = layers
    return make_config(model, seq, "ring", cp=1, ac="full", overrides=overrides)


def planned(cfg, hf_config, world: int) -> tuple[float, float]:
    """(GiB, seconds) the planner predicts for this row's config on a world of `world` GPUs (cp=1, dp=world)."""
    from parallel.planner import Layout, ModelShape, Workload, load_rates, memory_breakdown, step_time

    rates = load_rates(cfg.parallel.plan_calibration)
    shape, work = ModelShape.from_hf(hf_config), Workload.from_config(cfg)
    layout = Layout(world, 1, 1, 1, 1, None)
    mem = memory_breakdown(shape, layout, work, int(rates.overhead_gib * 2**30))
    return mem.total_gib, step_time(shape, layout, work, rates).total


def measure(
    model: str,
    spec: str,
    rank: int,
    switches: dict,
    world: int,
    device,
    warmup: int,
    steps: int,
    breakdown: bool = False,
    profile: str | None = None,
) -> dict:
    from transformers import AutoConfig

    from parallel.dims import ParallelDims
    from trainer.training_kind import training_kind

    kind, seq, *rest = spec.split(":")
    seq, layers = int(seq), int(rest[0]) if rest else None
    row = dict(kind=kind, seq=seq, layers=layers or "full")
    cfg = row_config(model, kind, seq, layers, rank, switches)
    if device.type == "cpu":
        cfg.model.dtype = "float32"  # the CPU kernels' dtype (smoke runs)
    fields = dict(cfg.model.config)
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    row["plan_gib"], row["plan_step_s"] = planned(cfg, hf_config, world)
    train_kind = training_kind(cfg, hf_config)
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with HostPeak() as host:
        dims = ParallelDims.from_config(cfg.parallel, world)
        fsdp = EngineRow(cfg, dims.build_mesh(device.type), dims, device, train_kind)
        counter = iter(range(10**9))

        def step() -> None:
            i = next(counter)
            fsdp.step(random_batches(cfg, i), i)

        meter = step_meter(device, fsdp.optimizer)
        try:
            t = run_steps(step, warmup, steps, device)
            if breakdown:
                row["breakdown"] = meter.timed_step(step)
            if profile:
                profile_step(step, profile, f"{model} {spec} {switches}")
        finally:
            meter.restore()
            fsdp.close()
    tok = seq / t
    row.update(
        step_s=t,
        tok_s=tok,
        mfu_pct=100 * tok * train_kind.flops_per_token(hf_config, seq) / PEAK_BF16 if gpu else 0.0,
        peak_gpu_gib=max_over_ranks(torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0),
        peak_host_gib=max_over_ranks(host.gib),
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="8b")
    ap.add_argument("--rows", nargs="+", default=["lora:262144", "full:98304"], help="kind:seq[:layers]")
    ap.add_argument("--rank", type=int, default=16, help="lora.r of the lora rows")
    ap.add_argument(
        "--set", default=SWITCHES, help="comma-separated KEY=VALUE config overrides for every row"
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=None,
        help="'label:key=value,...' overrides on top of --set (e.g. 'fp8:training.fp8=true'); repeat",
    )
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument(
        "--breakdown", action="store_true", help="time one more step by part (bench/meter.py step_meter)"
    )
    ap.add_argument(
        "--profile", default=None, help="file: profile one extra step per row, append its kernel time by part"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    _, world = init_dist(args.device)
    device = local_device(args.device)
    switches = parse_variant(f"switches:{args.set}")[1]
    variants = [parse_variant(v) for v in args.variant or ["base:"]]
    rows = []
    for spec, (label, overrides) in [(s, v) for s in args.rows for v in variants]:
        free_memory(device)
        t0 = time.perf_counter()
        try:
            row = measure(
                args.model,
                spec,
                args.rank,
                {**switches, **overrides},
                world,
                device,
                args.warmup,
                args.steps,
                args.breakdown,
                args.profile,
            )
        except Exception as e:  # an OOM or any failure: keep the other rows
            row = dict(kind=spec, error=describe_error(e))
        row["variant"] = label
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        log0(row)
    free_memory(device)
    meta = run_meta(
        args,
        device,
        world=world,
        dtype="lora: bf16 frozen base + fp32 adapters; full: fp32 masters, bf16 compute",
    )
    write_results(args.out, rows, meta)
    log0(f"\n{meta['gpu']} x{world}, torch {meta['torch']}, LoRA r={args.rank}, switches {args.set}")
    log0(markdown_table(rows, COLUMNS))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
