"""Model load: the whole-model path (from_pretrained in fp32 on the rank, then .to(device), as longctx did
before the meta-device build) vs the meta-device build with sharded safetensors reads, in one run.

    python -m bench.load --out $OUT/load.json                         # Llama-3.1-8B shape, one GPU
    python -m bench.load --dir /tmp/llama8b --paths old slices new --no-step --repeat 3 --out $OUT/load.json
    python -m bench.load --model 400m --device cpu --paths old slices new --no-step --repeat 3  # CPU profile
    python -m bench.load --model tiny --device cpu --out /tmp/l.json  # CPU smoke run

Paths: `old` (whole model), `new` (meta build, batched reads: models/safetensors_reader.py), `slices` (meta
build with the reader as it was before the batched reads - each slice by itself, cast on the host - for a
before/after of the reader in one run).

The model (random weights, bf16) is written once with `save_pretrained` to --dir on local disk (kept for
reruns). Each path then runs in its own fresh process (so host peaks do not mix; --repeat N runs N
processes per path and shows the one with the median load time): build the trainer (world of one; FSDP2
over it, full activation checkpointing, bf16 compute on fp32 masters) and run one optimizer step (not with
--no-step). Columns: load_time_s (model build: config to filled stage), load_cpu_s (CPU seconds of all
threads over the same span), first_step_s, to_first_step_s (Trainer() start to the end of step 1, compile
off), load_peak_mem_gib (max_memory_allocated during the load), step_gpu_gib (max during step 1: the steady
training peak), load_peak_host_gib (VmHWM during the load), host_peak_gib (the process' lifetime peak RSS).
The file is warm in the page cache for every path. Every path reads the same checkpoint, so the weights
checksum printed at the end must be identical.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    # ~400M parameters (0.75 GiB bf16): the CPU profile of the load (`--device cpu --no-step`).
    "400m": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        model_type="llama",
        vocab_size=695,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
}


def write_model(model: str, directory: Path, device: str) -> float:
    """save_pretrained a random bf16 model of `model`'s shape (initialised on `device`: fast)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    fields = dict(SHAPES[model])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    hf.save_pretrained(directory)
    del hf
    if torch.cuda.is_available():  # the measured paths run in child processes: leave them the whole card
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def _config(directory: Path, device: str, seq: int, extra: list[str]):
    from trainer.config import load_config

    return load_config(
        None,
        [
            f"model.path={directory}",
            "model.dtype=bfloat16",
            f"model.tokenizer={ROOT / 'configs/demo/tokenizer'}",
            f"data.path={ROOT / 'configs/demo/corpus.jsonl'}",
            f"data.cache_dir={directory}/../cache",
            "data.doc_mask=false",
            f"training.seq_len={seq}",
            "training.steps=1",
            f"training.device={device}",
            "parallel.activation_checkpointing=full",
            "checkpoint.export_hf=false",
            "checkpoint.resume=none",
            "logging.progress=false",
            f"output_dir={directory}/../run",
            *extra,
        ],
    )


def _old_trainer():
    """The trainer with main's build before the meta-device change: the whole model from_pretrained in fp32
    on the rank, moved to the device, then cut to the stage; the engine parallelises it as usual. The load
    is measured over the same span as the new path's (start of the build to the parallelised stage)."""
    from types import SimpleNamespace

    from models.causal_lm import CausalLMStage
    from models.registry import build_hf_model
    from trainer.model_build import LoadMeter
    from trainer.trainer import Trainer

    class OldTrainer(Trainer):
        def _build_stage(self):
            cfg = self.cfg
            self._meter = LoadMeter(self.device).__enter__()
            hf = build_hf_model(cfg.model.path, None, dtype=torch.float32)
            if self.device.type == "cuda":
                hf = hf.to(self.device)
            stage = CausalLMStage(hf, loss_chunk=cfg.training.loss_chunk)
            stage.doc_mask = cfg.data.doc_mask
            return stage

        def _engine_context(self):
            ctx = super()._engine_context()
            ctx.fill = self._loaded
            return ctx

        def _loaded(self, stage) -> None:
            self._meter.__exit__(None, None, None)
            self.stage_loader = SimpleNamespace(stats=self._meter.stats)

    return OldTrainer


def _per_slice_reads() -> None:
    """The `slices` path: the meta-device build with the reader as it was before the batched reads (issue 18's
    first version), for a before/after in one run: each request read by itself in row blocks of at most
    64 MiB into a fresh buffer, cast on the host, then a blocking copy to the destination."""
    from models.safetensors_io import BLOCK_BYTES, SafetensorsCheckpoint

    def read_many(self, requests) -> None:
        for key, offsets, out in requests:
            e = self.entries[key]
            if out.numel() == 0:
                continue
            shape = e.shape or (1,)
            row_bytes = torch.Size(shape[1:]).numel() * e.dtype.itemsize
            inner = tuple(slice(o, o + s) for o, s in zip(offsets[1:], out.shape[1:]))
            per_block = max(1, BLOCK_BYTES // row_bytes)
            first, rows = (offsets[0], out.shape[0]) if e.shape else (0, 1)
            for r in range(0, rows, per_block):
                n = min(per_block, rows - r)
                buf = bytearray(n * row_bytes)
                with open(e.file, "rb") as f:
                    f.seek(e.start + (first + r) * row_bytes)
                    f.readinto(buf)
                block = torch.frombuffer(buf, dtype=e.dtype).view(n, *shape[1:])[(slice(None), *inner)]
                if e.shape:
                    out[r : r + n].copy_(block)
                else:
                    out.copy_(block.reshape(()))

    SafetensorsCheckpoint.read_many = read_many


def _checksum(model: torch.nn.Module) -> float:
    """One number that differs when any loaded value (or which tensor holds it) differs: the paths that read
    the same checkpoint must agree exactly."""
    total = 0.0
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.named_parameters(), key=lambda item: item[0])):
            flat = (p.to_local() if hasattr(p, "to_local") else p).detach().reshape(-1)
            part = torch.zeros((), dtype=torch.float64, device=flat.device)
            for j in range(0, flat.numel(), 2**24):  # float64 in pieces: no whole-tensor copy
                x = flat[j : j + 2**24].double()
                part += x.sum() + x.square().sum()
            total += (i + 1) * part.item()
    return total


def run_path(path: str, directory: Path, device: str, seq: int, extra: list[str], step: bool = True) -> dict:
    """One path in this process: build, one step (unless `step` is false), measurements."""
    from trainer.model_build import host_peak_bytes  # noqa: F401 (same meter as the trainer)
    from trainer.trainer import Trainer

    t0 = time.perf_counter()
    if path == "slices":
        _per_slice_reads()
    cls = _old_trainer() if path == "old" else Trainer
    trainer = cls(_config(directory, device, seq, extra))
    dev = trainer.device
    row = {"path": path, **trainer.stage_loader.stats}  # the old path's own meter stands in for it
    row["weights_checksum"] = _checksum(trainer.model)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t1 = time.perf_counter()
    row.update(loss=None, error=None)
    try:
        if step:
            batches, _ = trainer._micro_batches()
            result = trainer.train_step(batches)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            row.update(loss=result.loss)
    except torch.OutOfMemoryError as exc:
        row.update(error=f"OOM: {str(exc)[:160]}")
    t2 = time.perf_counter()
    import resource

    row.update(
        first_step_s=t2 - t1 if step else None,
        to_first_step_s=t2 - t0 if step else None,
        step_gpu_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" and step else None,
        host_peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    )
    return row


def _median_row(rows: list[dict]) -> dict:
    """The run with the median load time, with every run's load time and host peak alongside."""
    if len(rows) == 1 or any(r.get("load_time_s") is None for r in rows):
        return rows[0]
    ranked = sorted(rows, key=lambda r: r["load_time_s"])
    row = dict(ranked[len(ranked) // 2])
    row["runs_load_time_s"] = [r["load_time_s"] for r in rows]
    row["runs_load_peak_host_gib"] = [r["load_peak_host_gib"] for r in rows]
    row["runs_load_cpu_s"] = [r.get("load_cpu_s") for r in rows]
    return row


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument(
        "--dir", default=None, help="where the model is saved (default: /tmp/longctx_load_<model>)"
    )
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--paths", nargs="+", default=["old", "new"], choices=["old", "slices", "new"])
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every path, e.g. lora.r=16 (the 8B step then fits one GPU)",
    )
    ap.add_argument("--no-step", action="store_true", help="measure the load only (no training step)")
    ap.add_argument(
        "--repeat", type=int, default=1, help="fresh processes per path; the median load is shown"
    )
    ap.add_argument(
        "--readers", type=int, default=None, help="reader threads of the new path (default: READERS)"
    )
    ap.add_argument(
        "--buffers", type=int, default=None, help="host read buffers of the new path (default: BUFFERS)"
    )
    ap.add_argument("--run-path", default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)
    directory = Path(args.dir or f"/tmp/longctx_load_{args.model}") / "model"
    if args.run_path:
        import models.safetensors_reader as reader

        reader.READERS = args.readers or reader.READERS
        if args.buffers:  # whichever of the two the destinations select
            reader.BUFFERS = reader.CPU_BUFFERS = args.buffers
        print(
            "ROW "
            + json.dumps(
                run_path(args.run_path, directory, args.device, args.seq, args.set, not args.no_step)
            ),
            flush=True,
        )
        return 0
    result = {
        "date": datetime.date.today().isoformat(),
        "model": args.model,
        "seq": args.seq,
        "set": args.set,
    }
    result["repeat"], result["step"] = args.repeat, not args.no_step
    result["readers"], result["buffers"] = args.readers, args.buffers
    result["rows"] = []
    if torch.cuda.is_available() and args.device == "cuda":
        result["device"] = torch.cuda.get_device_name()
    result["torch"] = torch.__version__
    if not (directory / "config.json").is_file():
        result["write_s"] = write_model(args.model, directory, args.device)
    sizes = [f.stat().st_size for f in directory.glob("*.safetensors")]
    result["checkpoint_gib"] = sum(sizes) / 2**30
    for path in args.paths:
        cmd = [sys.executable, "-m", "bench.load", "--run-path", path, "--model", args.model]
        cmd += ["--device", args.device, "--dir", str(directory.parent), "--seq", str(args.seq)]
        cmd += [f"--set={item}" for item in args.set] + (["--no-step"] if args.no_step else [])
        cmd += [f"--{k}={v}" for k, v in (("readers", args.readers), ("buffers", args.buffers)) if v]
        runs = []
        for _ in range(args.repeat):
            proc = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
            )
            rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if not rows:
                rows = [
                    {"path": path, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
                ]
            runs += rows
        result["rows"].append(_median_row(runs))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
    cols = [
        "path",
        "load_time_s",
        "load_cpu_s",
        "first_step_s",
        "to_first_step_s",
        "load_peak_mem_gib",
        "step_gpu_gib",
    ]
    cols += ["load_peak_host_gib", "host_peak_gib", "loss", "error"]
    print(
        f"{result.get('device', args.device)}, torch {torch.__version__}, {args.model} shape, "
        f"{result['checkpoint_gib']:.1f} GiB of safetensors, seq {args.seq}"
    )
    print("  ".join(cols))
    for r in result["rows"]:
        print("  ".join(_fmt(r.get(c)) for c in cols))
        if "runs_load_time_s" in r:
            print(
                f"  {r['path']} runs: load_s "
                + " ".join(f"{t:.2f}" for t in r["runs_load_time_s"])
                + ", load host GiB "
                + " ".join(f"{g:.2f}" for g in r["runs_load_peak_host_gib"])
                + ", load cpu_s "
                + " ".join(_fmt(c) for c in r["runs_load_cpu_s"])
            )
    sums = {r["path"]: r.get("weights_checksum") for r in result["rows"]}
    same = len({v for v in sums.values() if v is not None}) == 1
    print(f"weights checksum per path: {sums} - {'identical' if same else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
