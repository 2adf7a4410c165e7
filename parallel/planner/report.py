"""Rank the layouts, print the `--plan` table, and compare predictions with bench measurements."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from parallel.dims import ConfigError, ParallelDims
from parallel.planner.calibration import GIB, DeviceRates, load_rates
from parallel.planner.cost import StepTime, step_time
from parallel.planner.enumerate import Candidate, Layout, enumerate_layouts
from parallel.planner.load import LoadMemory, load_memory
from parallel.planner.memory import MemoryBreakdown, ModelShape, Workload, memory_breakdown

MAX_VALID_ROWS = 40
MAX_NAMES = 4  # layouts listed per invalid reason


@dataclass
class PlanRow:
    candidate: Candidate
    memory: MemoryBreakdown | None
    time: StepTime | None
    limit_bytes: int
    load: LoadMemory | None = None
    host_limit_bytes: int | None = None

    @property
    def load_fits(self) -> bool:
        if self.load is None:
            return True
        host_ok = self.host_limit_bytes is None or self.load.host_per_node <= self.host_limit_bytes
        return self.load.gpu <= self.limit_bytes and host_ok

    @property
    def layout(self) -> Layout:
        return self.candidate.layout

    @property
    def valid(self) -> bool:
        return self.candidate.reason is None

    @property
    def fits(self) -> bool:
        return (
            self.valid
            and self.memory is not None
            and self.memory.total <= self.limit_bytes
            and self.load_fits
        )

    @property
    def reason(self) -> str:
        """Why this row cannot run ('' when it can)."""
        if not self.valid:
            return str(self.candidate.reason)
        if not self.load_fits:
            assert self.load is not None
            return (
                f"load OOM: {self.load.gpu_gib:.1f} GiB/GPU, {self.load.host_gib:.0f} GiB host per node "
                f"(limits {self.limit_bytes / GIB:.0f}, {(self.host_limit_bytes or 0) / GIB:.0f})"
            )
        if not self.fits:
            assert self.memory is not None
            return f"OOM: needs {self.memory.total_gib:.1f} GiB > {self.limit_bytes / GIB:.0f} GiB"
        return ""


def planner_settings(cfg: Any) -> tuple[int, float | None, str | None]:
    """(gpus_per_node, device memory GiB or None = the calibration's, calibration path) from cfg.parallel."""
    p = cfg.parallel
    return p.gpus_per_node, p.device_memory_gib, p.plan_calibration


def plan_rows(
    cfg: Any,
    world_size: int,
    hf_config: Any,
    *,
    fixed: dict[str, int] | None = None,
    rates: DeviceRates | None = None,
    pp_supported: bool | None = None,
) -> list[PlanRow]:
    """Every layout for `world_size`, costed and ranked: fitting rows by tokens/s/GPU (best first), then
    valid rows that run out of memory (smallest first), then invalid rows."""
    gpn, mem_gib, calib = planner_settings(cfg)
    rates = rates or load_rates(calib)
    limit = int((mem_gib if mem_gib else rates.memory_gib) * GIB)
    work = Workload.from_config(cfg)
    shape = ModelShape.from_hf(hf_config)
    kw = {} if pp_supported is None else {"pp_supported": pp_supported}
    cands = enumerate_layouts(
        world_size,
        shape,
        work.seq_len,
        sequence_parallel=work.sequence_parallel,
        sequences_per_step=work.grad_accum * work.micro_batch_size,
        pp_microbatches=work.pp_microbatches,
        pp_schedule=work.pp_schedule,
        fixed=fixed,
        **kw,
    )
    overhead = int(rates.overhead_gib * GIB)
    host = getattr(cfg.parallel, "host_memory_gib", None)
    host_limit = int(host * GIB) if host else None
    random_init = getattr(cfg.model, "path", None) is None
    rows = []
    for c in cands:
        if work.lora_rank and c.layout.tp > 1 and c.reason is None:
            c.reason = "parallel.tp: LoRA runs without TP (the adapters are not tensor-parallel)"
        if c.reason is None:
            mem = memory_breakdown(shape, c.layout, work, overhead)
            load = load_memory(shape, c.layout, work, gpn, overhead, random_init)
            timing = step_time(shape, c.layout, work, rates, gpn)
            rows.append(PlanRow(c, mem, timing, limit, load, host_limit))
        else:
            rows.append(PlanRow(c, None, None, limit))
    preferred = cfg.parallel.cp_layout

    def key(r: PlanRow) -> tuple:
        lay = r.layout
        tie = (lay.cp_layout not in (None, preferred), lay.tp, lay.pp, lay.label(), lay.ulysses)
        if r.fits:
            return (0, -r.time.tokens_per_s_per_gpu, *tie)
        if r.valid:
            return (1, r.memory.total, *tie)
        return (2, 0, *tie)

    return sorted(rows, key=key)


def current_layout(cfg: Any, world_size: int) -> Layout | None:
    """The layout `cfg` asks for, or None when the planner is to choose it (or it is malformed)."""
    p = cfg.parallel
    if p.auto or p.cp_strategy == "auto":
        return None
    try:
        dims = ParallelDims.from_config(p, world_size)
    except ConfigError:
        return None
    return Layout(dims.dp, dims.tp, dims.pp, dims.cp, dims.ulysses, p.cp_layout if dims.cp > 1 else None)


def overrides_for(layout: Layout) -> str:
    """The command-line overrides that select `layout`."""
    return " ".join(f"parallel.{k}={v}" for k, v in layout.parallel_fields().items())


def _fmt_row(i: int, r: PlanRow, mark: str) -> list[str]:
    lay = r.layout
    if r.memory is None or r.time is None:
        return [str(i), lay.label() + mark, lay.strategy_label(), "-", "-", "no", *["-"] * 10]
    t = r.time
    parts = [t.matmul, t.attention, t.recompute, t.cp_comm, t.tp_comm, t.fsdp_comm, t.pp_bubble]
    return [
        str(i),
        lay.label() + mark,
        lay.strategy_label(),
        f"{r.memory.total_gib:.1f}",
        "-" if r.load is None else f"{r.load.gpu_gib:.1f}",
        "yes" if r.fits else ("load OOM" if not r.load_fits else "OOM"),
        _ms(t.total),
        *(_ms(x) for x in parts),
        f"{t.tokens_per_s_per_gpu:.0f}",
    ]


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return "0" if ms == 0 else f"{ms:.4g}" if ms < 1e4 else f"{ms:.0f}"


HEADER = ["#", "layout", "cp strategy", "GiB/GPU", "load GiB", "fits", "step ms"]
HEADER += ["matmul", "attn", "recomp", "cp", "tp", "fsdp", "bubble", "tok/s/GPU"]


def _table(lines: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return [
        "  ".join(
            v.rjust(w) if j != 1 and j != 2 else v.ljust(w) for j, (v, w) in enumerate(zip(row, widths))
        )
        for row in lines
    ]


def format_plan(cfg: Any, world_size: int, hf_config: Any, rows: list[PlanRow], rates: DeviceRates) -> str:
    gpn, _, calib = planner_settings(cfg)
    work = Workload.from_config(cfg)
    shape = ModelShape.from_hf(hf_config)
    limit = rows[0].limit_bytes / GIB if rows else rates.memory_gib
    current = current_layout(cfg, world_size)
    out = [
        f"plan for {world_size} GPUs ({gpn} per node), {rates.device}, fit limit {limit:.0f} GiB/GPU",
        f"calibration: {calib or 'built-in H100 defaults'}",
        f"model: {shape.layers} layers, hidden {shape.hidden}, heads {shape.heads} (kv {shape.kv_heads}, "
        f"head_dim {shape.head_dim}), intermediate {shape.intermediate}, vocab {shape.vocab}",
        f"workload: seq_len {work.seq_len}, micro_batch {work.micro_batch_size}, grad_accum "
        f"{work.grad_accum}, {'bf16' if work.compute_bytes == 2 else 'fp32'} compute, activation "
        f"checkpointing {work.activation_checkpointing}{_switches(work)}; times in ms per optimizer step",
        "",
    ]
    valid = [r for r in rows if r.valid]
    invalid = [r for r in rows if not r.valid]
    lines = [HEADER]
    for i, r in enumerate(valid[:MAX_VALID_ROWS], 1):
        lines.append(_fmt_row(i, r, " *" if r.layout == current else ""))
    if valid:
        out += _table(lines)
        if len(valid) > MAX_VALID_ROWS:
            out.append(f"... {len(valid) - MAX_VALID_ROWS} more valid layouts not shown")
        if current is not None:
            out.append("* = the layout of the current config")
    else:
        out.append("no valid layout for this world size and model")
    oom = [r for r in valid if not r.fits]
    out.append("")
    best = next((r for r in valid if r.fits), None)
    if best is not None:
        out.append(
            f"best: {best.layout.label()} {best.layout.strategy_label()}, {best.memory.total_gib:.1f} GiB/GPU, "
            f"{best.time.tokens_per_s_per_gpu:.0f} tokens/s/GPU"
        )
        out.append(f"  use it: {overrides_for(best.layout)}   (or parallel.auto=true)")
        if best.load is not None:
            out.append(_load_line(best, cfg))
    elif valid:
        out.append("nothing fits: try activation_checkpointing=full, a shorter seq_len or more GPUs")
    if oom:
        out.append(f"{len(oom)} valid layouts exceed the memory limit (marked OOM)")
    if invalid:
        out.append(f"invalid layouts ({len(invalid)}), by reason:")
        by_reason: dict[str, list[str]] = {}
        for r in invalid:
            by_reason.setdefault(r.reason, []).append(f"{r.layout.label()} {r.layout.strategy_label()}")
        for reason, names in by_reason.items():
            shown = "; ".join(names[:MAX_NAMES]) + (
                f"; ... {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else ""
            )
            out.append(f"  {reason}")
            out.append(f"      {shown}")
    if world_size > gpn:
        out.append(f"note: groups spanning nodes use {rates.internode_gbps:g} GB/s per GPU (an assumption)")
    return "\n".join(out)


def _load_line(row: PlanRow, cfg: Any) -> str:
    load = row.load
    host = f" of {row.host_limit_bytes / GIB:.0f}" if row.host_limit_bytes else ""
    source = (
        "model.path safetensors, own slices" if getattr(cfg.model, "path", None) else "seeded random init"
    )
    return (
        f"  load ({source}): {load.gpu_gib:.1f} GiB/GPU, {load.host_gib:.1f}{host} GiB host per node - fits; "
        f"a whole fp32 model per rank would need {load.whole / GIB:.1f} GiB on every GPU and host rank"
    )


def plan_main(cfg: Any, world_size: int, hf_config: Any) -> int:
    """`train.py --plan`: print the ranked layouts for `world_size` GPUs; no process group. Returns 0.
    With activation_checkpointing=auto the table is for the mode the run would choose."""
    from parallel.planner.auto import resolve_checkpointing  # auto.py builds on this module

    if cfg.parallel.activation_checkpointing == "auto":
        cfg = resolve_checkpointing(cfg, world_size, hf_config)
        print(f"activation_checkpointing=auto: {cfg.parallel.activation_checkpointing}", flush=True)
    _, _, calib = planner_settings(cfg)
    rates = load_rates(calib)
    rows = plan_rows(cfg, world_size, hf_config, rates=rates)
    print(format_plan(cfg, world_size, hf_config, rows, rates), flush=True)
    return 0


def compare_with_measurements(
    rows: Sequence[Mapping[str, Any]], mem_tol: float = 0.15, time_tol: float = 0.20
) -> str:
    """Markdown table of predicted vs measured memory and step time, for docs/BENCHMARKS.md.

    Each row: `layout` (label), `pred_mem_gib`, `meas_mem_gib`, `pred_step_s`, `meas_step_s` (a missing
    or None value shows as '-'). Error = (predicted - measured) / measured; a cell is 'ok' within the
    tolerance (default 15% for memory, 20% for time), else 'off'.
    """

    def cell(pred: Any, meas: Any, tol: float, fmt: str) -> list[str]:
        if pred is None or meas is None or not meas:
            return [fmt.format(pred) if pred is not None else "-", fmt.format(meas) if meas else "-", "-"]
        err = (pred - meas) / meas
        return [fmt.format(pred), fmt.format(meas), f"{err:+.0%} {'ok' if abs(err) <= tol else 'off'}"]

    lines = [
        "| layout | pred GiB | meas GiB | mem error | pred step s | meas step s | time error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = cell(r.get("pred_mem_gib"), r.get("meas_mem_gib"), mem_tol, "{:.1f}")
        t = cell(r.get("pred_step_s"), r.get("meas_step_s"), time_tol, "{:.3f}")
        lines.append("| " + " | ".join([str(r.get("layout", "?")), *mem, *t]) + " |")
    return "\n".join(lines) + "\n"


def _switches(work) -> str:
    """The memory switches that are on, as the config spells them."""
    on = [
        f"ac_group {work.ac_group}" if work.ac_group > 1 else "",
        "activation_offload" if work.activation_offload else "",
        f"mlp_chunks {work.mlp_chunks}" if work.mlp_chunks > 1 else "",
        "fsdp_cpu_offload" if work.fsdp_cpu_offload else "",
        "cp_accum input" if work.cp_accum == "input" else "",
        "compiled" if work.compiled else "",
        f"LoRA r={work.lora_rank} (frozen base)" if work.lora_rank else "",
    ]
    return "".join(f", {x}" for x in on if x)
