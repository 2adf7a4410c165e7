"""Planner predictions vs GPU measurements (issue: within 20% step time, 15% peak memory, same ranking).

    python -m bench.planner_validation [--results bench/results/2026-11-25]
    python -m bench.planner_validation --memory-only bench/results/2026-11-25/session2/long_8b_lean.json

Reads the bench/train.py result files of a run directory, rebuilds each measured layout's config exactly
as bench/train.py did, asks the planner (parallel/planner) for its prediction, and prints the comparison
table plus whether the measured order of layouts is the predicted one. `--memory-only FILE...` compares
only the peak memory of bench/train.py runs whose times are not comparable (one step without warm-up, whose
peak precedes AdamW's moments: the prediction leaves them out), with each row's --variant overrides and
--layers. CPU only: no GPU needed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

from bench.train import make_config, parse_variant


def measured_rows(results_dir: str) -> list[dict]:
    """Every successful longctx (non-peer) training row, the latest measurement of each layout winning."""
    rows: dict[tuple, dict] = {}
    paths = [p for p in glob.glob(os.path.join(results_dir, "train_*.json")) if "before_fix" not in p]
    for path in sorted(paths, key=os.path.getmtime):
        if first_step_only(path):
            continue  # one step without warm-up: for --memory-only
        data = json.load(open(path))
        world = data["meta"].get("world", 2)
        for r in data["rows"]:
            if (
                r.get("impl") in ("ring", "ulysses")
                and not r.get("error")
                and r.get("variant", "base") == "base"
            ):
                key = (r["model"], r["impl"], r["seq"], r.get("ac", "full"), world)
                rows[key] = {**r, "ac": key[3], "world": world}
    return list(rows.values())


def first_step_only(path: str) -> bool:
    """Whether a file measured one step without warm-up (max_context probes always do): its peaks precede
    AdamW's moments."""
    data = json.load(open(path))
    return "probes" in data or data["meta"].get("args", {}).get("warmup", 1) == 0  # session 1 files: no args


def variant_rows(path: str) -> list[tuple[dict, dict]]:
    """(row, its config overrides) for every row of a bench/train.py or bench.max_context (fsdp2 engine)
    result file (OOM rows included)."""
    data = json.load(open(path))
    if "probes" in data:  # max_context: one layout, one row per probed length
        overrides = dict(data["overrides"])
        if data["offload"]:
            overrides["parallel.fsdp_cpu_offload"] = True
        label = f"max_context{' offload' if data['offload'] else ''}"
        return [
            (dict(model=data["model"], impl=data["strategy"], seq=p["seq"], ac=data["ac"], variant=label,
                  peak_gib=p.get("peak_gib")), overrides)
            for p in data["probes"]
        ]  # fmt: skip
    args = data["meta"]["args"]
    variants = dict(parse_variant(v) for v in args.get("variant") or ["base:"])
    layers = args.get("layers")
    out = []
    for r in data["rows"]:
        if r["impl"] == "peer":
            continue  # the planner models longctx's layouts, not the peer's
        label = r["variant"].removesuffix(f"-L{layers}") if layers else r["variant"]
        overrides = dict(variants[label])
        if layers:
            overrides["model.config.num_hidden_layers"] = layers
        out.append((r, overrides))
    return out


def attention_rows(path: str) -> list[dict]:
    """longctx rows of a bench/attention.py result file (single-GPU kernel, ring, Ulysses; torch's own CP is
    the peer, not a layout): impl, total tokens S, heads, kv_heads, head_dim, world, fwd+bwd ms."""
    data = json.load(open(path))
    meta = data["meta"]
    out = []
    for r in data["rows"]:
        impl = r["impl"].split("/")[0].split()[0]  # "single/cudnn gqa=native" -> "single"
        if impl in ("single", "ring", "ulysses") and r.get("fwdbwd_ms"):
            gqa = r["impl"].split("gqa=")[1] if "gqa=" in r["impl"] else None
            head_dim = r.get("head_dim") or meta["args"]["head_dim"]
            out.append(dict(impl=impl, gqa=gqa, S=r["S"], heads=r["heads"], kv_heads=r["kv_heads"],
                            head_dim=head_dim, world=meta["world"], meas_ms=r["fwdbwd_ms"]))  # fmt: skip
    return out


def predict_attention(row: dict) -> float:
    """The cost model's fwd+bwd seconds of one attention layer as bench/attention.py runs it: its attention
    and CP-communication terms for a one-layer model without checkpointing; the single row is one rank's
    causal block (S / world tokens) on one GPU."""
    from parallel.planner.calibration import load_rates
    from parallel.planner.cost import step_time
    from parallel.planner.enumerate import Layout
    from parallel.planner.memory import ModelShape, Workload

    d, world = row["head_dim"], row["world"]
    shape = ModelShape(layers=1, hidden=row["heads"] * d, heads=row["heads"], kv_heads=row["kv_heads"],
                       head_dim=d, intermediate=row["heads"] * d, vocab=2)  # fmt: skip
    if row["impl"] == "single":
        layout, seq = Layout(1, 1, 1, 1, 1, None), row["S"] // world
    else:
        layout, seq = Layout(1, 1, 1, world, world if row["impl"] == "ulysses" else 1, "zigzag"), row["S"]
    t = step_time(shape, layout, Workload(seq_len=seq), load_rates(None))
    return t.attention + t.cp_comm


def attention_table(paths: list[str], tol: float = 0.20) -> str:
    """Predicted vs measured attention fwd+bwd, and per shape whether the measured order is predicted."""
    lines = ["| layout | pred ms | meas ms | error |", "|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for path in paths:
        for r in attention_rows(path):
            pred = 1000 * predict_attention(r)
            err = (pred - r["meas_ms"]) / r["meas_ms"]
            gqa = f" gqa={r['gqa']}" if r["gqa"] else ""
            label = (
                f"{r['impl']}{gqa} S={r['S'] // 1024}k heads {r['heads']}/{r['kv_heads']} d={r['head_dim']}"
            )
            lines.append(
                f"| {label} | {pred:.1f} | {r['meas_ms']:.1f} | {err:+.0%} {'ok' if abs(err) <= tol else 'off'} |"
            )
            if r["impl"] != "single":  # the single row is another workload (one block), not a rival layout
                key = (path, r["S"], r["kv_heads"], r["head_dim"], r["gqa"])
                groups.setdefault(key, []).append((r["impl"], pred, r["meas_ms"]))
    order = [
        measured_order(f"{path} S={seq // 1024}k kv_heads={kv_heads}", items)
        for (path, seq, kv_heads, _, _), items in groups.items()
        if len(items) > 1
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(order) + "\n"


def measured_order(name: str, items: list[tuple[str, float, float]]) -> str:
    """Whether layouts (label, predicted, measured) rank the same by prediction as by measurement."""
    by_pred = [label for label, _, _ in sorted(items, key=lambda x: x[1])]
    by_meas = [label for label, _, _ in sorted(items, key=lambda x: x[2])]
    return f"{name}: measured order {by_meas} - predicted {'same' if by_pred == by_meas else by_pred}"


def predict(row: dict, world: int = 2, overrides: dict | None = None):
    from transformers import AutoConfig

    from parallel.planner import plan_rows

    cfg = make_config(row["model"], row["seq"], row["impl"], cp=world, ac=row["ac"], overrides=overrides)
    fields = dict(cfg.model.config)
    hf = AutoConfig.for_model(fields.pop("model_type"), **fields)
    fixed = dict(dp=1, tp=1, pp=1, cp=world)
    for r in plan_rows(cfg, world, hf, fixed=fixed):
        one_gpu = world == 1  # no CP: the single layout, whatever strategy the row was labelled with
        if r.valid and (one_gpu or (r.layout.strategy == row["impl"] and r.layout.cp_layout == "zigzag")):
            return r
    raise LookupError(f"no planner row for {row}")


def main() -> None:
    from parallel.planner.report import compare_with_measurements

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="bench/results/2026-11-25")
    ap.add_argument("--memory-only", nargs="+", default=None, metavar="FILE")
    ap.add_argument("--attention", nargs="+", default=None, metavar="FILE", help="bench/attention.py results")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="FILE",
        help="timed bench/train.py rows with --variant overrides",
    )
    args = ap.parse_args()
    if args.attention:
        print(attention_table(args.attention))
        return
    if args.memory_only:
        table = []
        for path in args.memory_only:
            first = first_step_only(path)
            for row, overrides in variant_rows(path):
                p = predict(row, overrides=overrides)
                # A first step's peak comes before AdamW creates its moments (on the GPU unless offloaded).
                pred = p.memory.allocated - (p.memory.optimizer if first else 0)
                table.append(
                    dict(
                        layout=f"{row['model']} {row['impl']} {row['seq'] // 1024}k {row['variant']}"
                        + (" (1st step)" if first else ""),
                        pred_mem_gib=pred / 2**30,
                        meas_mem_gib=row.get("peak_gib"),  # None: the step ran out of memory
                    )
                )
        print(compare_with_measurements(table))
        return
    if args.variants:  # one table per file: its rows ran in one process, on one card
        for path in args.variants:
            meta = json.load(open(path))["meta"]
            world = meta.get("world", 2)
            timed = []
            for row, overrides in variant_rows(path):
                if row.get("step_s"):
                    label = (
                        f"{row['model']} {row['impl']} {row['seq'] // 1024}k ac={row['ac']} {row['variant']}"
                    )
                    timed.append((row, world, overrides, label))
            print(f"{path} ({meta.get('gpu', '?')} x{world})")
            print_timed(timed)
        return
    timed = []
    for row in sorted(
        measured_rows(args.results), key=lambda r: (r["world"], r["model"], r["seq"], r["impl"], r["ac"])
    ):
        gpus = "" if row["world"] == 2 else f" {row['world']} GPU{'s' if row['world'] > 1 else ''}"
        label = f"{row['model']} {row['impl']} {row['seq'] // 1024}k ac={row['ac']}{gpus}"
        timed.append((row, row["world"], None, label))
    print_timed(timed)


def print_timed(timed: list[tuple[dict, int, dict | None, str]]) -> None:
    """Predicted vs measured memory and step time of timed rows, then per (model, seq) whether the measured
    order of the layouts is the predicted one."""
    from parallel.planner.report import compare_with_measurements

    table, pairs = [], []
    for row, world, overrides, label in timed:
        p = predict(row, world=world, overrides=overrides)
        table.append(
            dict(
                layout=label,
                pred_mem_gib=p.memory.allocated / 2**30,
                meas_mem_gib=row["peak_gib"],
                pred_step_s=p.time.total,
                meas_step_s=row["step_s"],
            )
        )
        pairs.append((label, p.time.total, row["step_s"]))
    print(compare_with_measurements(table))
    groups: dict[str, list] = {}
    for label, pred, meas in pairs:
        groups.setdefault(" ".join(label.split()[:1] + label.split()[2:3]), []).append((label, pred, meas))
    for name, items in groups.items():
        if len(items) > 1:
            print(measured_order(name, items))


if __name__ == "__main__":
    main()
