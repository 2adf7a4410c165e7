"""Where a training step's time goes, without torch.profiler: timed wrappers around named functions.

The profiler failed inside cuDNN attention calls on the GPU image (IndexError, torch 2.11), and a
profile's overhead distorts second-long steps anyway. A `StepMeter` wraps the attention kernels'
forward/backward, the optimizer step and the loss (`step_meter`); while `timing` is on, each call is bracketed
by CUDA events (host clock on CPU) that are read only after the step's final synchronize, so the timed
step runs unsynchronised like any other. What the wrappers do not cover (matmuls, norms, RoPE, FSDP
and CP communication waits) is the remainder.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import torch


class _HostEvent:
    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _HostEvent) -> float:
        return (end.t - self.t) * 1e3


class StepMeter:
    def __init__(self, device: torch.device):
        self.gpu = device.type == "cuda"
        self.timing = False
        self.calls: dict[str, int] = defaultdict(int)
        self._pairs: dict[str, list] = defaultdict(list)
        self._undo: list[Callable[[], None]] = []

    def _event(self):
        return torch.cuda.Event(enable_timing=True) if self.gpu else _HostEvent()

    def wrap(self, fn: Callable, key: str) -> Callable:
        def timed(*args, **kwargs):
            self.calls[key] += 1
            if not self.timing:
                return fn(*args, **kwargs)
            start, end = self._event(), self._event()
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self._pairs[key].append((start, end))
            return out

        return timed

    def patch(self, owner, name: str, key: str) -> None:
        """Replace owner.name by its timed wrapper until `restore()`."""
        original = getattr(owner, name)
        setattr(owner, name, self.wrap(original, key))
        self._undo.append(lambda: setattr(owner, name, original))

    def patch_kernels(self) -> None:
        """Every registered attention kernel: forward calls counted as attn_fwd, backward as attn_bwd."""
        import parallel.cp.kernels as kernels

        for name, k in list(kernels.KERNELS.items()):
            kernels.KERNELS[name] = kernels.Kernel(
                k.name, self.wrap(k.forward, "attn_fwd"), self.wrap(k.backward, "attn_bwd"), k.device
            )
            self._undo.append(lambda name=name, k=k: kernels.KERNELS.__setitem__(name, k))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def timed_step(self, step: Callable[[], None]) -> dict[str, float]:
        """Run one step with the wrappers timing; milliseconds per key, the whole step and the remainder."""
        self._pairs.clear()
        self.timing = True
        start, end = self._event(), self._event()
        try:
            start.record()
            step()
            end.record()
        finally:
            self.timing = False
        if self.gpu:
            torch.cuda.synchronize()
        out = {key: sum(s.elapsed_time(e) for s, e in pairs) for key, pairs in self._pairs.items()}
        out["step"] = start.elapsed_time(end)
        out["other"] = out["step"] - sum(v for k, v in out.items() if k != "step")
        return {f"{k}_ms": round(v, 1) for k, v in out.items()}


def step_meter(device: torch.device, optimizer) -> StepMeter:
    """A StepMeter on a training step's parts: attention kernels, the loss (whichever training.loss_impl:
    the chunked loss's chunks with their backward recompute; the fused and liger losses compute their
    gradients in the forward call that is timed) and `optimizer.step`. `restore()` when done."""
    import models.causal_lm
    import models.loss

    meter = StepMeter(device)
    meter.patch_kernels()
    meter.patch(models.loss, "_chunk_loss", "loss")
    meter.patch(models.causal_lm, "fused_cross_entropy_sum", "loss")
    meter.patch(models.causal_lm, "liger_cross_entropy_sum", "loss")
    meter.patch(optimizer, "step", "optimizer")
    return meter


# Kernel name fragments -> the part of the step a GPU kernel belongs to (first match wins; lower case).
KERNEL_PARTS = (
    ("attention", ("fmha", "flash", "cudnn", "sdpa", "attn")),
    ("fp8 matmul", ("e4m3", "e5m2", "f8f8", "fp8", "nvjet_qq")),  # nvjet_qq*: cuBLAS' FP8 (qq) kernels
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
    ("communication", ("nccl", "gloo")),
    ("copies", ("memcpy", "memset")),
    ("fused elementwise (compiled)", ("triton",)),
)


def kernel_part(name: str) -> str:
    low = name.lower()
    return next((part for part, keys in KERNEL_PARTS if any(k in low for k in keys)), "other")


def parts_table(times_us: dict[str, float]) -> str:
    """Markdown table of kernel time by `kernel_part`, from {kernel name: self time in us}."""
    parts: dict[str, float] = defaultdict(float)
    for name, us in times_us.items():
        parts[kernel_part(name)] += us
    total = sum(parts.values()) or 1.0
    rows = sorted(parts.items(), key=lambda kv: -kv[1])
    lines = ["| part | ms | share |", "|---|---|---|"]
    lines += [f"| {part} | {us / 1e3:.1f} | {us / total:.1%} |" for part, us in rows]
    return "\n".join(lines) + "\n"
