"""Longest sequence that trains one full step (fwd, bwd, AdamW) without OOM, for a model and CP layout.

    python -m bench.max_context --model 8b --cp 2 --strategy ring --offload --lo 65536 --hi 1048576
    python -m bench.max_context --model 8b --cp 2 --engine deepspeed --lo 65536 --hi 1048576
    python -m bench.max_context --config configs/llama3_8b_128k.yaml --lo 131072 --hi 1048576
    python -m bench.max_context --model 8b --cp 2 --offload --set parallel.ac_group=4 \
        --set parallel.activation_offload=true --set parallel.mlp_chunks=8 --lo 262144 --hi 1048576

--engine fsdp2 (default) probes bench.train's FSDP2 step (--offload: parallel.fsdp_cpu_offload; --ac, --set
KEY=VALUE config overrides such as the memory switches, --layers for a shallower model of the same shape);
--engine deepspeed probes bench.engines' ds_z3_offload row (ZeRO-3, parameters and optimizer on the CPU,
torch AdamW; --offload is implied). --device cpu runs the probes on gloo (smoke tests: --model tiny).

Each probe is a fresh `torchrun` (an OOM on one rank would otherwise leave the other stuck in a
collective); a probe that fails or outlives --probe-timeout counts as too long. Binary search over
multiples of --granularity; with --probes it just runs the given lengths and fits peak memory linearly in
the length to estimate where it would reach the card's memory (an estimate, labelled as such).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys

RESULT = "MAXCTX_RESULT "
DEEPSPEED_ROW = "ds_z3_offload"  # the bench.engines row that --engine deepspeed probes


# What a run config contributes to a probe: the model's shape and every setting that changes memory; the
# sequence length is the probe's, and data/checkpoint/logging keys do not apply to random-token steps.
CONFIG_KEYS = [
    "model.dtype",
    "model.attn_kernel",
    "training.loss_chunk",
    *(
        f"parallel.{k}"
        for k in (
            "cp_strategy ulysses cp_layout activation_checkpointing ac_group activation_offload mlp_chunks "
            "fsdp_cpu_offload reshard_after_forward compile"
        ).split()
    ),
]


def config_overrides(path: str) -> dict:
    """A trainer YAML (validated as train.py does) as bench overrides: the HF config fields of its model
    (hub id, local dir or inline; random init of that shape) plus CONFIG_KEYS."""
    from models.registry import load_hf_config
    from trainer.config import load_config

    cfg = load_config(path, [])
    hf = load_hf_config(cfg.model.path, cfg.model.config).to_diff_dict()
    out = {"model.config": {k: v for k, v in hf.items() if k != "transformers_version"}}
    for key in CONFIG_KEYS:
        section, leaf = key.split(".")
        out[key] = getattr(getattr(cfg, section), leaf)
    return out


def overrides_of(args) -> dict:
    """--config's settings, then --set KEY=VALUE pairs (YAML scalars) and --layers, as bench.train overrides."""
    import yaml

    out = config_overrides(args.config) if args.config else {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE (e.g. parallel.ac_group=4)")
        out[key.strip()] = yaml.safe_load(value)
    if args.layers:
        out["model.config.num_hidden_layers"] = args.layers
    return out


def probe_child(args) -> None:
    if args.engine == "deepspeed":
        return probe_child_deepspeed(args)
    import torch

    from bench.common import describe_error, init_dist, local_device
    from bench.train import measure

    rank, world = init_dist(args.device)
    device = local_device(args.device)
    try:
        row = measure(
            args.model,
            args.probe,
            args.strategy,
            world,
            rank,
            warmup=0,
            steps=1,
            offload=args.offload,
            ac=args.ac,
            overrides=overrides_of(args),
            device=device,
        )
        row["ok"] = True
        if args.config:
            row["model"] = os.path.basename(args.config)
    except torch.OutOfMemoryError as e:
        row = dict(ok=False, seq=args.probe, error=describe_error(e, limit=160))
    report(row, device)


def probe_child_deepspeed(args) -> None:
    """One step of bench.engines' ds_z3_offload row at --probe tokens (its errors, OOM included, come
    back in the row)."""
    from bench import engines

    opts = engines.parse_args(
        ["--model", args.model, "--device", args.device, "--strategy", args.strategy]
        + ["--seqs", str(args.probe), "--engines", DEEPSPEED_ROW, "--warmup", "0", "--steps", "1"]
    )
    device, mesh, dims = engines.setup(opts)
    row = engines.run_row(opts, DEEPSPEED_ROW, args.probe, mesh, dims, device)
    row["ok"] = "error" not in row
    report(row, device)


def report(row: dict, device) -> None:
    """A probe's last act: rank 0 prints its row (with the card's memory) for the parent to read."""
    import torch

    if torch.distributed.get_rank() == 0:
        if device.type == "cuda":
            row["gpu_total_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        print(RESULT + json.dumps(row), flush=True)
    torch.distributed.destroy_process_group()


def run_probe(args, seq: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(args.cp),
        "-m",
        "bench.max_context",
        "--probe",
        str(seq),
        "--model",
        args.model,
        "--strategy",
        args.strategy,
        "--engine",
        args.engine,
        "--device",
        args.device,
    ]
    if args.offload:
        cmd.append("--offload")
    cmd += ["--ac", args.ac] + [f"--set={item}" for item in args.set]
    if args.config:
        cmd += ["--config", args.config]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    # Own session, so a timed-out probe's ranks die with it instead of holding GPU memory for the next one.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=args.probe_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return dict(ok=False, seq=seq, error=f"timeout after {args.probe_timeout}s")
    for line in out.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    tail = (err or "").strip().splitlines()[-1:] or ["no output"]
    return dict(ok=False, seq=seq, error=f"exit {proc.returncode}: {tail[0][:160]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="8b")
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("--strategy", default="ring", choices=["ring", "ulysses"])
    ap.add_argument(
        "--offload", action="store_true", help="parallel.fsdp_cpu_offload (params/grads/optimizer on CPU)"
    )
    ap.add_argument(
        "--engine",
        default="fsdp2",
        choices=["fsdp2", "deepspeed"],
        help="deepspeed: ZeRO-3 with parameters and optimizer offloaded to the CPU (bench.engines)",
    )
    ap.add_argument(
        "--config",
        default=None,
        help="a train.py YAML: its model shape, cp and memory settings (--engine fsdp2; --set still applies)",
    )
    ap.add_argument("--ac", default="full", help="parallel.activation_checkpointing (--engine fsdp2)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (--engine fsdp2); repeat",
    )
    ap.add_argument("--layers", type=int, default=None, help="num_hidden_layers override (--engine fsdp2)")
    ap.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo smoke runs (tiny models)"
    )
    ap.add_argument("--lo", type=int, default=65536)
    ap.add_argument("--hi", type=int, default=1 << 20)
    ap.add_argument("--granularity", type=int, default=32768)
    ap.add_argument(
        "--probes", type=int, nargs="*", default=None, help="run exactly these lengths, then extrapolate"
    )
    ap.add_argument("--probe-timeout", type=int, default=900)
    ap.add_argument("--probe", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.probe is not None:
        return probe_child(args)
    if args.config:  # the layout is the config's: one process per CP rank
        from trainer.config import load_config

        p = load_config(args.config, []).parallel
        if max(p.tp, p.pp, p.dp) > 1:
            ap.error(
                f"{args.config}: the finder probes CP layouts only (dp = tp = pp = 1); got {p.dp=} {p.tp=} {p.pp=}"
            )
        args.cp = p.cp
        if p.cp_strategy in ("ring", "ulysses"):
            args.strategy = p.cp_strategy  # (hybrid runs as the config says; the label stays)

    overrides = overrides_of(args)
    results = []

    def probe(seq):
        r = run_probe(args, seq)
        r.setdefault("seq", seq)
        results.append(r)
        print(
            f"seq {seq:>8d}: "
            + (
                f"ok, step {r['step_s']:.1f} s"
                + (f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else "")
                if r["ok"]
                else f"FAILED {r['error']}"
            ),
            flush=True,
        )
        return r["ok"]

    best = None
    if args.probes:
        for s in args.probes:
            if probe(s) and (best is None or s > best):
                best = s
    else:
        g = args.granularity
        lo, hi = args.lo // g, args.hi // g  # invariant: lo*g fits (checked first), hi*g is the upper bound
        if probe(lo * g):
            best = lo * g
            if probe(hi * g):
                best, lo = hi * g, hi
            while hi - lo > 1 and best != hi * g:
                mid = (lo + hi) // 2
                if probe(mid * g):
                    lo, best = mid, mid * g
                else:
                    hi = mid
    ok = [r for r in results if r["ok"] and r.get("peak_gib") is not None]  # no GPU memory on CPU
    estimate = None
    if len(ok) >= 2:  # peak memory is linear in the length once weights are fixed: fit and extrapolate
        (s0, m0), (s1, m1) = [(r["seq"], r["peak_gib"]) for r in sorted(ok, key=lambda r: r["seq"])[-2:]]
        slope = (m1 - m0) / (s1 - s0)
        limit = ok[-1].get("gpu_total_gib", 79.0) - 2.0
        if slope > 0:
            estimate = int(s1 + (limit - m1) / slope)
    offloaded = args.offload or args.engine == "deepspeed"  # the deepspeed probe always offloads
    summary = dict(
        date=datetime.date.today().isoformat(),
        model=os.path.basename(args.config) if args.config else args.model,
        engine=args.engine,
        cp=args.cp,
        strategy=args.strategy,
        offload=offloaded,
        ac=args.ac,
        overrides=overrides,
        longest_ok=best,
        linear_estimate=estimate,
        probes=results,
    )
    print(
        f"\n{args.model} {args.engine} cp={args.cp} {args.strategy} offload={offloaded}: "
        f"longest measured step {best} tokens"
        + (f"; linear memory fit reaches the card at ~{estimate} tokens (estimate)" if estimate else "")
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
