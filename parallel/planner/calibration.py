"""Device rates the cost model divides by, read from a calibration JSON.

The default file (calibration_h100.json, next to this module) holds H100 NVLink numbers (where each comes
from: docs/parallelism.md, "Device rates"); `python -m parallel.planner.calibrate --out file.json` writes a new one for the current GPU and
`parallel.plan_calibration=file.json` makes the planner use it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from parallel.dims import ConfigError

DEFAULT_CALIBRATION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration_h100.json")
GIB = 1024**3


@dataclass(frozen=True)
class DeviceRates:
    device: str
    memory_gib: float
    """Memory per GPU the device has (the planner's default fit limit)."""
    matmul_tflops: float
    """Dense bf16 GEMM rate reached by the model's projections."""
    attention_tflops: dict[int, float]
    """Causal fwd+bwd attention rate by head_dim (3.5 x forward FLOPs convention)."""
    alltoall_gibps: float
    p2p_gibps: float
    collective_gibps: float
    """All-reduce / all-gather / reduce-scatter bus bandwidth inside a node."""
    internode_gbps: float
    """Per-GPU bandwidth of any group that spans nodes (decimal GB/s)."""
    elementwise_gbps: float = 1450.0
    """Effective rate (decimal GB/s) of the memory-bound work per byte the cost model counts for it: the
    norms, SiLU, RoPE, residual adds, loss and optimizer bytes of cost.py, against the time of every
    kernel that is neither matmul, attention nor NCCL (which also covers copies the count leaves out)."""
    fp32_speed: float = 0.089
    """Fraction of the bf16 rates reached when model.dtype is float32."""
    overhead_gib: float = 2.0
    """CUDA context, NCCL buffers and allocator slack added to every prediction."""
    fp8_matmul_tflops: float | None = None
    """training.fp8, tensorwise: the effective FP8 GEMM rate of one forward (fast accumulation) plus two
    backward GEMMs (exact accumulation), as torchao runs them; None = 2 x matmul_tflops (Hopper's FP8:bf16
    datasheet ratio) - an assumption until `--calibrate` measures it."""
    fp8_rowwise_matmul_tflops: float | None = None
    """The same with one scale per row (fp8_recipe=rowwise); None = fp8_matmul_tflops."""
    assumptions: list[str] = field(default_factory=list)

    def fp8_rate(self, recipe: str = "tensorwise") -> float:
        """TF/s of the FP8 projections for `recipe` (tensorwise | rowwise | rowwise_with_gw_hp, whose FP8
        GEMMs are rowwise-scaled; cost.py times its bf16 weight-gradient GEMM at the bf16 rate)."""
        tensorwise = self.fp8_matmul_tflops or 2 * self.matmul_tflops
        if recipe.startswith("rowwise"):
            return self.fp8_rowwise_matmul_tflops or tensorwise
        return tensorwise

    def attention_rate(self, head_dim: int) -> float:
        """TF/s at `head_dim`: the measured value, else log-linear interpolation, clamped at the ends."""
        points = sorted(self.attention_tflops.items())
        if head_dim <= points[0][0]:
            return points[0][1]
        if head_dim >= points[-1][0]:
            return points[-1][1]
        for (d0, r0), (d1, r1) in zip(points, points[1:]):
            if d0 <= head_dim <= d1:
                w = math.log(head_dim / d0) / math.log(d1 / d0)
                return r0 + w * (r1 - r0)
        raise AssertionError("unreachable")

    def bandwidth(self, kind: str, intra_node: bool) -> float:
        """Bytes/s for a collective of `kind` (alltoall | p2p | collective) inside a node or across nodes."""
        if not intra_node:
            return self.internode_gbps * 1e9
        return {"alltoall": self.alltoall_gibps, "p2p": self.p2p_gibps, "collective": self.collective_gibps}[
            kind
        ] * GIB


_REQUIRED = ("matmul_tflops", "attention_tflops", "alltoall_gibps", "p2p_gibps", "internode_gbps")


def _optional(raw: dict, key: str) -> float | None:
    return None if raw.get(key) is None else float(raw[key])


def load_rates(path: str | None = None) -> DeviceRates:
    """Read a calibration JSON (None = the built-in H100 defaults); one-line ConfigError on bad files."""
    path = path or DEFAULT_CALIBRATION
    key = "parallel.plan_calibration"
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(key, f"calibration file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(key, f"cannot read {path}: {' '.join(str(exc).split())}") from None
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ConfigError(key, f"{path} lacks {', '.join(missing)}")
    try:
        attn = {int(k): float(v) for k, v in raw["attention_tflops"].items()}
        rates = DeviceRates(
            device=str(raw.get("device", "unknown")),
            memory_gib=float(raw.get("memory_gib", 80.0)),
            matmul_tflops=float(raw["matmul_tflops"]),
            attention_tflops=attn,
            alltoall_gibps=float(raw["alltoall_gibps"]),
            p2p_gibps=float(raw["p2p_gibps"]),
            collective_gibps=float(raw.get("collective_gibps", raw["alltoall_gibps"])),
            internode_gbps=float(raw["internode_gbps"]),
            elementwise_gbps=float(raw.get("elementwise_gbps", 1450.0)),
            fp32_speed=float(raw.get("fp32_speed", 0.089)),
            overhead_gib=float(raw.get("overhead_gib", 2.0)),
            fp8_matmul_tflops=_optional(raw, "fp8_matmul_tflops"),
            fp8_rowwise_matmul_tflops=_optional(raw, "fp8_rowwise_matmul_tflops"),
            assumptions=list(raw.get("assumptions", [])),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(key, f"{path}: bad value ({' '.join(str(exc).split())})") from None
    fp8 = [r for r in (rates.fp8_matmul_tflops, rates.fp8_rowwise_matmul_tflops) if r is not None]
    if not attn or min(attn.values()) <= 0 or rates.matmul_tflops <= 0 or min(fp8, default=1) <= 0:
        raise ConfigError(key, f"{path}: rates must be positive")
    return rates
