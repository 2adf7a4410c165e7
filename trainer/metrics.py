"""Training metrics: model FLOPs / MFU, console lines, metrics.jsonl, progress bar and W&B (rank 0 only).

MFU convention (also in docs and in metrics.jsonl's `flops_per_token`):
  flops_per_token = 6 * N_matmul + 6 * L * d_attn * S
where N_matmul counts the weights of every linear layer (q, k, v, o, MLP projections and the LM head;
not the embedding lookup, norms or biases), L = layers, d_attn = num_heads * head_dim, S = seq_len.
6 = 2 (multiply-add) x 3 (forward + backward). The attention term is the full-attention 12*L*d_attn*S
halved because causal attention computes half the score matrix. Activation recomputation is not counted
(this is model FLOPs, not hardware FLOPs). MFU = tokens/s/GPU * flops_per_token / peak FLOP/s.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from models.registry import head_dim_of

logger = logging.getLogger(__name__)

# Dense (no sparsity) bf16/fp16 tensor-core peaks, FLOP/s. Matched on the CUDA device name, most specific first.
_BF16_PEAKS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
)


def flops_per_token(hf_config: Any, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward) for a Llama-family HF config; see module doc."""
    d = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = head_dim_of(hf_config)
    layers = hf_config.num_hidden_layers
    d_attn = heads * head_dim
    attn_weights = d * d_attn + 2 * d * kv_heads * head_dim + d_attn * d  # q, k, v, o
    mlp_weights = 3 * d * hf_config.intermediate_size  # gate, up, down
    n_matmul = layers * (attn_weights + mlp_weights) + d * hf_config.vocab_size  # + LM head
    return float(6 * n_matmul + 6 * layers * d_attn * seq_len)


def device_peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak dense FLOP/s of one device for `dtype`; None when unknown (CPU, fp32 path, other GPUs) -> no MFU."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _BF16_PEAKS if key in name), None)


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_line(step: int, total: int | None, m: dict[str, Any]) -> str:
    """One console line; fields missing from `m` are left out."""
    parts = [f"step {step}/{total}" if total else f"step {step}"]
    fields = (
        ("loss", "loss {:.4f}"),
        ("grad_norm", "grad_norm {:.3f}"),
        ("lr", "lr {:.1e}"),
        ("tokens_per_s_per_gpu", "tok/s/gpu {:.0f}"),
        ("mfu", None),
        ("peak_mem_gib", "mem {:.1f} GiB"),
        ("data_time_s", None),
        ("step_time_s", "step {:.2f} s"),
        ("eta_s", None),
    )
    for key, fmt in fields:
        value = m.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value) and key != "loss"):
            continue
        if key == "mfu":
            parts.append(f"mfu {100 * value:.1f}%")
        elif key == "data_time_s":
            parts.append(f"data {1000 * value:.0f} ms")
        elif key == "eta_s":
            parts.append(f"eta {_fmt_duration(value)}")
        else:
            parts.append(fmt.format(value))
    return " | ".join(parts)


class NullMetricsLogger:
    """What non-logging ranks get: the same interface, doing nothing."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_eval(self, step: int, scalars: dict[str, Any], images: dict, tables: dict) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLogger:
    """Rank 0: console lines every `logging.every` steps, metrics.jsonl, tqdm bar (TTY only), W&B.

    `MetricsLogger(...)` on any other rank returns a NullMetricsLogger. `cfg` is the LoggingConfig or
    the whole Config (then training.steps gives the total). The trainer passes raw measurements to
    `log`; derived fields are filled in when missing: tokens_per_s and tokens_per_s_per_gpu from
    `tokens` (global tokens this step) and step_time_s, mfu from those and flops_per_token/peak_flops.
    """

    def __new__(cls, cfg: Any, output_dir: str | os.PathLike, rank: int, *args: Any, **kwargs: Any):
        if rank != 0:
            return NullMetricsLogger()
        return super().__new__(cls)

    def __init__(
        self,
        cfg: Any,
        output_dir: str | os.PathLike,
        rank: int,
        world_size: int,
        resolved_config: dict[str, Any],
        *,
        total_steps: int | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        start_step: int = 0,
    ) -> None:
        self.cfg = getattr(cfg, "logging", cfg)
        training = getattr(cfg, "training", None)
        self.total = total_steps if total_steps is not None else getattr(training, "steps", None)
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._start_step = start_step
        self._t0 = time.perf_counter()
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._bar = None
        if self.cfg.progress and sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout
            )
        self._wandb = self._init_wandb(resolved_config) if self.cfg.wandb else None

    def _init_wandb(self, resolved_config: dict[str, Any]) -> Any:
        import wandb

        id_file = self.output_dir / "wandb_run_id"
        run_id = os.environ.get("WANDB_RUN_ID")
        if not run_id:
            # Stored in the run dir so a resumed (requeued) job continues the same W&B run.
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
        return wandb.init(
            project=os.environ.get("WANDB_PROJECT", "longctx"),
            entity=os.environ.get("WANDB_ENTITY"),
            dir=str(self.output_dir),
            config=resolved_config,
            id=run_id,
            resume="allow",
        )

    def _derive(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        m = {"step": step, **metrics}
        dt = m.get("step_time_s")
        if "tokens_per_s" not in m and m.get("tokens") is not None and dt:
            m["tokens_per_s"] = m["tokens"] / dt
        if "tokens_per_s_per_gpu" not in m and m.get("tokens_per_s") is not None:
            m["tokens_per_s_per_gpu"] = m["tokens_per_s"] / self.world_size
        if "mfu" not in m:
            tps = m.get("tokens_per_s_per_gpu")
            ok = tps is not None and self.flops_per_token and self.peak_flops
            m["mfu"] = tps * self.flops_per_token / self.peak_flops if ok else None
        if self.total and step > self._start_step:
            per_step = (time.perf_counter() - self._t0) / (step - self._start_step)
            m.setdefault("eta_s", per_step * max(self.total - step, 0))
        for key in ("loss", "grad_norm", "lr", "peak_mem_gib", "data_time_s", "step_time_s", "tokens_per_s"):
            m.setdefault(key, None)
        return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in m.items()}

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Call every step: advances the bar; writes lines/JSONL/W&B on every `logging.every`-th step."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
        every = max(int(self.cfg.every), 1)
        if step % every and step != self.total:
            return
        m = self._derive(step, metrics)
        logger.info(format_line(step, self.total, m))
        self._jsonl.write(json.dumps(m, default=float) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in m.items() if v is not None and k != "step"}, step=step)

    def log_eval(self, step: int, scalars: dict[str, Any], images: dict, tables: dict) -> None:
        """An evaluation's results to W&B (the console line and files come from trainer/eval_report.py):
        scalars, images {key: PNG path} and tables {key: (columns, rows)}."""
        if self._wandb is None:
            return
        import wandb

        payload: dict[str, Any] = {k: v for k, v in scalars.items() if v is not None}
        payload.update({k: wandb.Image(str(p)) for k, p in images.items()})
        payload.update({k: wandb.Table(columns=c, data=r) for k, (c, r) in tables.items()})
        self._wandb.log(payload, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """End-of-run values: a console line, `<output_dir>/summary.json`, and the W&B run summary."""
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        logger.info("summary | " + " | ".join(f"{k} {v}" for k, v in values.items()))
        (self.output_dir / "summary.json").write_text(json.dumps(values, indent=2, default=float))
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if not self._jsonl.closed:
            self._jsonl.close()
