"""FP8 numerics: the same training run in bf16 and in FP8, loss curves compared step by step, next to a
bf16 control that differs from the bf16 run only by rounding.

    python -m bench.fp8_numerics --out $OUT/fp8_numerics.json                  # one H200, ~7 minutes
    python -m bench.fp8_numerics --model tiny --device cpu --steps 6 --seq 256   # CPU smoke run (no FP8)

Each run is `train.py` itself (one rank via torchrun): the 1B shape of bench/train.py (16 layers, hidden
2048, vocab 128256; random init), same seed, same data order, same schedule (AdamW 3e-4, 20 warm-up steps,
cosine), bf16 compute + compile. Runs: `bf16`; `fp8` (training.fp8, the only change; --recipes rowwise
adds `fp8_rowwise`; --variant NAME:fp8=true,fp8_bf16_layers=1 a run with those training keys); `control`
(bf16 with training.loss_impl=fused: the same maths with other bf16 rounding - how far two runs part when
only rounding differs, the noise floor FP8 must be read against). seq_len is 8192 (not 64k) so the runs fit
one device command; the FP8 matmuls are the same GEMM shapes per token at any length, only attention (not
FP8) grows.

Data (--corpus): `fresh` (default) generates as many documents of the demo grammar (trainer/data/demo.py,
another seed than the shipped file) as the run reads, so no document is seen twice and the loss measures
the grammar, not memorisation; `demo` reads the shipped configs/demo/corpus.jsonl (~250k tokens), which
200 steps of 2 x 8192 tokens repeat ~13 times (a measurement on it ended with both runs memorising it).

--concurrent starts the runs together on the one device (three 1B runs at 16k tokens fit an H200 with
room to spare): the same curves - each run is its own process with the same seed and data - in about half
the wall time, but their tokens/s then measure a shared GPU, not a speed.

`--between A.json:bf16 B.json:bf16` runs nothing and compares two curves of earlier runs the same way: two
bf16 runs of the same settings on a GPU part too (nondeterministic kernels), the other scale to read against.

Reported, for x = fp8 and x = control, from the relative difference (loss_x - loss_bf16) / loss_bf16 after
the warm-up steps: its largest and mean magnitude per step, the same on the curves (the means of
consecutive 10-step windows; each window's signed value too), the mean per step in the first and the
second half of the run, and each run's median tokens/s. The issue's target: within 1%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import IO

import yaml

from models.fp8 import RECIPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = "configs/demo/tokenizer"


def fresh_corpus(path: str, tokens: int) -> str:
    """A JSONL corpus of new demo-grammar documents holding at least `tokens` tokens (1.3x margin for the
    packer's padding and split ends); written once per run set."""
    from transformers import AutoTokenizer

    from trainer.data.demo import SEED, make_corpus

    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, TOKENIZER))
    sample = make_corpus(200, seed=SEED + 1000)
    per_doc = sum(len(tok(t)["input_ids"]) for t in sample) / len(sample)
    docs = make_corpus(int(1.3 * tokens / per_doc) + 1, seed=SEED + 1000)
    with open(path, "w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def run_config(
    model: str,
    seq: int,
    batch: int,
    steps: int,
    device: str,
    out_dir: str,
    data: str,
    overrides: dict,
) -> dict:
    from transformers import AutoTokenizer

    from bench.train import MODELS

    fields = dict(MODELS[model])
    vocab = len(AutoTokenizer.from_pretrained(os.path.join(ROOT, TOKENIZER)))
    fields["vocab_size"] = max(fields["vocab_size"], vocab)  # the tiny smoke shape has fewer ids
    return {
        "model": {
            "config": fields,
            "tokenizer": TOKENIZER,
            "dtype": "bfloat16" if device == "cuda" else "float32",
        },
        "data": {"path": data, "doc_mask": False, "shuffle": True},
        "parallel": {"compile": device == "cuda", "activation_checkpointing": "none"},
        "training": {
            "seq_len": seq,
            "micro_batch_size": batch,
            "steps": steps,
            "seed": 0,
            "device": device,
            **overrides,
        },
        "optim": {"lr": 3e-4, "warmup_steps": min(20, steps // 4), "scheduler": "cosine"},
        "checkpoint": {"export_hf": False, "keep": 1},
        "logging": {"every": 1, "progress": False},
        "output_dir": out_dir,
    }


@dataclass
class Run:
    """One `train.py` process of `start`."""

    name: str
    proc: subprocess.Popen
    log: IO[str]
    out_dir: str


def start(cfg: dict, work: str, name: str) -> Run:
    """Launch `train.py` on `cfg` (one rank via torchrun); its output goes to <work>/<name>.log."""
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    # --standalone: each run its own free rendezvous port, so runs can share the machine (--concurrent)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd += ["train.py", "--config", path]
    log = open(os.path.join(work, f"{name}.log"), "w", encoding="utf-8")  # noqa: SIM115 - closed in finish
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    return Run(name, proc, log, cfg["output_dir"])


def finish(run: Run) -> list[dict]:
    """Wait for a run of `start`; its logged steps (the rows of metrics.jsonl that carry a loss)."""
    code = run.proc.wait()
    run.log.close()
    if code != 0:
        with open(run.log.name, encoding="utf-8") as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"{run.name} run failed (exit {code}):\n{tail}")
    with open(os.path.join(run.out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    shutil.rmtree(run.out_dir, ignore_errors=True)  # the final checkpoint (~15 GB at 1B) is not needed
    return [r for r in rows if r.get("loss") is not None]


def block_means(xs: list[float], block: int) -> list[float]:
    return [sum(xs[i : i + block]) / len(xs[i : i + block]) for i in range(0, len(xs), block)]


def compare(base: list[float], other: list[float], warmup: int, block: int = 10) -> dict:
    """How far `other` is from `base` after `warmup` steps: per step (max, mean), on the curves (means of
    consecutive `block`-step windows: signed per window, and the largest), and the mean per-step difference
    in the first and second half of those steps (a steep early descent amplifies any perturbation)."""
    base, other = base[warmup:], other[warmup:]
    per_step = [abs(o - b) / b for b, o in zip(base, other)]
    if not per_step:
        return {}
    blocks = [(o - b) / b for b, o in zip(block_means(base, block), block_means(other, block))]
    half = len(per_step) // 2
    return {
        "max_rel_diff_step": max(per_step),
        "mean_rel_diff_step": sum(per_step) / len(per_step),
        f"max_rel_diff_block{block}": max(map(abs, blocks)),
        f"rel_diff_block{block}": blocks,
        "mean_rel_diff_step_first_half": sum(per_step[:half]) / max(half, 1),
        "mean_rel_diff_step_second_half": sum(per_step[half:]) / len(per_step[half:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b", help="a bench/train.py shape (tiny for CPU smoke runs)")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2, help="sequences per step")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of the comparison")
    ap.add_argument("--corpus", default="fresh", choices=["fresh", "demo"], help="see the module docstring")
    ap.add_argument(
        "--recipes",
        nargs="*",
        default=["tensorwise"],
        choices=RECIPES,
        help="one FP8 run per training.fp8_recipe (tensorwise: named fp8; rowwise: fp8_rowwise, ...); none: only --variant runs",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="one more run: bf16 with these training.* keys (e.g. fp8_edge1:fp8=true,fp8_bf16_layers=1)",
    )
    ap.add_argument("--no-control", action="store_true", help="skip the bf16 rounding control run")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke run, fp8 off")
    ap.add_argument(
        "--concurrent",
        action="store_true",
        help="run the variants at once on the one device (same curves; their tokens/s are then not speeds)",
    )
    ap.add_argument("--out", default=None, help="JSON file for the curves and the summary")
    ap.add_argument(
        "--between",
        nargs=2,
        metavar="FILE:RUN",
        help="run nothing: compare two curves of earlier --out files (e.g. the bf16 runs of two commands)",
    )
    args = ap.parse_args()
    if args.between:
        curves = []
        for spec in args.between:
            path, _, name = spec.rpartition(":")
            with open(path, encoding="utf-8") as f:
                curves.append(json.load(f)["loss"][name])
        for key, value in compare(*curves, args.warmup).items():
            print(
                f"{key}: "
                + (" ".join(f"{v:+.2%}" for v in value) if isinstance(value, list) else f"{value:.4g}")
            )
        return
    work = tempfile.mkdtemp(prefix="fp8_numerics_")
    if args.corpus == "fresh":
        data = fresh_corpus(os.path.join(work, "corpus.jsonl"), args.steps * args.batch * args.seq)
    else:
        data = "configs/demo/corpus.jsonl"
    variants: dict[str, dict] = {"bf16": {}}
    for recipe in args.recipes:  # on CPU a second bf16 run (a smoke test of the bench)
        name = "fp8" if recipe == "tensorwise" else f"fp8_{recipe}"
        variants[name] = {"fp8": args.device == "cuda", "fp8_recipe": recipe}
    for spec in args.variant:
        name, _, keys = spec.partition(":")
        variants[name] = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in keys.split(",") if kv)}
    if not args.no_control:
        variants["control"] = {"loss_impl": "fused"}
    curves, running = {}, []
    for name, overrides in variants.items():
        cfg = run_config(
            args.model,
            args.seq,
            args.batch,
            args.steps,
            args.device,
            os.path.join(work, name),
            data,
            overrides,
        )
        running.append(start(cfg, work, name))
        if not args.concurrent:
            curves[name] = finish(running.pop())
    for run in running:
        curves[run.name] = finish(run)
    shutil.rmtree(work, ignore_errors=True)
    loss = {k: [r["loss"] for r in rows] for k, rows in curves.items()}
    summary = {}
    for name in loss:
        if name != "bf16":
            summary.update(
                {f"{name}_{k}": v for k, v in compare(loss["bf16"], loss[name], args.warmup).items()}
            )
    for name, rows in curves.items():
        tps = sorted(r["tokens_per_s"] for r in rows[args.warmup :] if r.get("tokens_per_s"))
        summary[f"{name}_tokens_per_s_median"] = tps[len(tps) // 2] if tps else None
        summary[f"{name}_peak_mem_gib"] = max((r.get("peak_mem_gib") or 0.0) for r in rows)
        summary[f"{name}_final_loss"] = loss[name][-1]
    import torch

    from bench.common import run_meta

    meta = run_meta(args, torch.device(args.device))  # after the runs: this process touches the GPU last
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "summary": summary, "loss": loss}, f, indent=1)
    others = [n for n in loss if n != "bf16"]
    print("step | bf16 loss | " + " | ".join(f"{n} loss | {n} rel diff" for n in others))
    steps = min(len(v) for v in loss.values())
    for i in [0, args.warmup, *range(args.warmup + 20, args.steps, 20), args.steps - 1]:
        if 0 <= i < steps:
            b = loss["bf16"][i]
            cells = " | ".join(f"{loss[n][i]:9.4f} | {abs(loss[n][i] - b) / b:7.2%}" for n in others)
            print(f"{i + 1:4d} | {b:9.4f} | {cells}")
    for key, value in summary.items():
        if isinstance(value, list):
            value = " ".join(f"{v:+.2%}" for v in value)
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
