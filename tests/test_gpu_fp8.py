"""training.fp8 and training.loss_impl on a Hopper GPU: what the CPU tests cannot show.

1. `train.py` end to end on the demo model in bf16 + compile, with and without FP8 (tensorwise, so FSDP2
   all-gathers FP8 weights and the scale hook runs), CP over every visible GPU (2 -> ring CP=2; one H200
   -> CP=1: NCCL runs one rank per GPU): both finish, checkpoint, resume and export; the FP8 loss curve
   stays within 2% of bf16 at every step.
2. The trainer's FSDP2 engine in bf16 on every visible GPU (at most 2, NCCL; `torchrun -m
   tests.test_gpu_fp8`): FP8 with FP8 all-gather, with the local cast, and rowwise against the same run
   without FP8 - every step's loss and the first step's gradients of every parameter, on cuBLAS' FP8 GEMMs
   (tests/fp8_engines.py; tests/test_fp8.py runs the same checks on one gloo rank). On one GPU FSDP2 skips
   the collective but still casts the weight shards to FP8 and builds the FP8 weights from them.
3. The loss implementations on CUDA in bf16: fused (eager and compiled) and liger (when installed) give
   the chunked loss' value and gradients.
4. A LoRA base cast to FP8 once (training.fp8_cache_frozen) against casting in every matmul, on cuBLAS'
   FP8 GEMMs: the same loss and adapter gradients bit for bit in eager mode, within 1e-3 compiled (where
   the uncached cast runs in Triton; tests/test_fp8.py's check on CUDA).
Skipped without CUDA, without torchao, or below compute capability 9.0 (the loss test needs CUDA only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from models.fp8 import torchao_missing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="FP8 needs a Hopper (sm90) GPU or later",
)
needs_torchao = pytest.mark.skipif(torchao_missing() is not None, reason="torchao not installed (.[fp8])")


def _train(out, steps: int, extra: list[str]) -> list[float]:
    gpus = min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "train.py"]
    cmd += ["--config", "configs/demo.yaml", "training.device=cuda", "model.dtype=bfloat16"]
    cmd += ["parallel.compile=true", "parallel.dp=1", f"parallel.cp={gpus}", "training.micro_batch_size=1"]
    cmd += [f"training.steps={steps}", "checkpoint.interval=4", "logging.progress=false", "logging.every=1"]
    cmd += [f"output_dir={out}", *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["loss"] for r in rows if "step" in r and r.get("loss") is not None]


@hopper
@needs_torchao
def test_fp8_train_py_matches_bf16_and_resumes(tmp_path):
    steps = 12
    bf16 = _train(tmp_path / "bf16", steps, [])
    fp8 = _train(tmp_path / "fp8", steps, ["training.fp8=true"])
    assert len(bf16) == len(fp8) == steps
    worst = max(abs(a - b) / b for a, b in zip(fp8, bf16))
    print("bf16", bf16, "\nfp8 ", fp8, f"\nmax relative difference {worst:.2e}")
    assert worst < 2e-2
    assert fp8 != bf16  # FP8 really ran
    assert (tmp_path / "fp8" / "hf" / "config.json").exists()
    # Resume from the FP8 checkpoint (FP8-cast weight wrappers in the DCP state) and go 4 steps further.
    more = _train(tmp_path / "fp8", steps + 4, ["training.fp8=true"])
    assert len(more) > steps


@hopper
@needs_torchao
def test_fp8_engine_matches_bf16_losses_and_grads():
    gpus = min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus)]
    cmd += ["-m", "tests.test_gpu_fp8"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(res.stdout[-6000:], res.stderr[-6000:])
    assert res.returncode == 0 and "ALL OK" in res.stdout, "FP8 engine check failed (output above)"


def _engine_worker() -> int:
    import torch.distributed as dist

    from tests import fp8_engines

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    res = fp8_engines.train_cases(rank, world, "cuda", "bfloat16", fp8_engines.cases(all_gather=True))
    dist.destroy_process_group()
    if rank:
        return 0
    for name, got in res.items():
        print(f"{name:15s} losses", " ".join(f"{x:.5f}" for x in got["losses"]))
    print(f"{world} GPU(s); largest gradient difference from no-fp8:", fp8_engines.grad_errors(res))
    bad = fp8_engines.check(res, loss_tol=2e-3, grad_tol=0.25)
    print("\n".join(bad) or "ALL OK")
    return 1 if bad else 0


def _loss_case(dtype=torch.bfloat16, seed=0, tokens=8192, d=512, v=32000):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = (torch.randn(1, tokens, d, device="cuda", generator=gen) * 0.5).to(dtype).requires_grad_()
    head = torch.nn.Linear(d, v, bias=False, device="cuda", dtype=dtype)
    labels = torch.randint(0, v, (1, tokens), device="cuda", generator=gen)
    labels[:, :100] = -100
    return hidden, head, labels


def _run(fn, hidden, head, labels):
    loss = fn(hidden, head, labels) * 0.25
    gh, gw = torch.autograd.grad(loss, [hidden, head.weight])
    return loss.detach().float(), gh.float(), gw.float()


def test_loss_impls_match_chunked_on_cuda():
    from models.fused_loss import fused_cross_entropy_sum, liger_cross_entropy_sum, liger_missing
    from models.loss import chunked_cross_entropy_sum

    hidden, head, labels = _loss_case()
    ref = _run(lambda h, m, y: chunked_cross_entropy_sum(h, m, y, 2048), hidden, head, labels)
    impls = {
        "fused": lambda h, m, y: fused_cross_entropy_sum(h, m, y, 2048),
        "fused-compiled": lambda h, m, y: fused_cross_entropy_sum(h, m, y, 2048, compiled=True),
    }
    if liger_missing() is None:
        impls["liger"] = liger_cross_entropy_sum
    for name, fn in impls.items():
        got = _run(fn, hidden, head, labels)
        errs = [((g - r).norm() / r.norm()).item() for g, r in zip(got, ref)]
        print(name, [f"{e:.1e}" for e in errs])
        assert errs[0] < 1e-3 and errs[1] < 2e-2 and errs[2] < 2e-2, (name, errs)


if __name__ == "__main__":
    sys.exit(_engine_worker())


@hopper
@needs_torchao
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_frozen_weights_cast_once_on_cuda(recipe):
    from tests.test_fp8 import frozen_cache_check

    frozen_cache_check(recipe, torch.device("cuda"), compiled=True, compiled_tol=1e-3)
