"""What an evaluation writes (rank 0): `<output_dir>/eval.jsonl`, the loss-by-position plot, the passkey
JSON and heatmap under `<output_dir>/eval/`, a console line and, with W&B, scalars, images and a table."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("longctx")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fresh(path: Path) -> Path:
    """`path`, or `<stem>-2<suffix>`, `-3`, ... when it exists: an --eval-only run over a training run's
    directory never overwrites the files that run wrote for the same step."""
    candidate, n = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def _label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _run_label(rec: dict) -> str:
    return f"step {rec['step']}" + (" (eval-only)" if "weights" in rec else "")


def plot_loss_by_position(records: list[dict], path: Path) -> None:
    """One line per evaluation (step) in `records`: mean loss per position bucket."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for rec in records:
        buckets = [b for b in rec.get("loss_by_position", []) if b["loss"] is not None]
        if buckets:
            ax.plot(range(len(buckets)), [b["loss"] for b in buckets], marker="o", label=_run_label(rec))
    if records and records[-1].get("loss_by_position"):
        ticks = records[-1]["loss_by_position"]
        ax.set_xticks(
            range(len(ticks)), [f"{_label(b['from'])}-{_label(b['to'])}" for b in ticks], rotation=30
        )
    ax.set_xlabel("token position inside its document")
    ax.set_ylabel("mean held-out loss")
    ax.set_title("held-out loss by position")
    ax.grid(alpha=0.3)
    if records:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_passkey(passkey: dict, step: int, path: Path) -> None:
    """Length x depth heatmap of the pass rate (1 = retrieved, 0 = not)."""
    plt = _pyplot()
    trials = passkey["trials"]
    lengths = sorted({t["length"] for t in trials})
    depths = sorted({t["depth"] for t in trials})
    grid = [[0.0] * len(lengths) for _ in depths]
    counts = [[0] * len(lengths) for _ in depths]
    for t in trials:
        i, j = depths.index(t["depth"]), lengths.index(t["length"])
        grid[i][j] += float(t["passed"])
        counts[i][j] += 1
    grid = [[g / c if c else float("nan") for g, c in zip(row, crow)] for row, crow in zip(grid, counts)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.55 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(f"passkey retrieval, step {step}: {passkey['accuracy']:.0%}")
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _line(record: dict) -> str:
    parts = [f"eval step {record['step']}"]
    if "eval_loss" in record:
        parts += [
            f"eval_loss {record['eval_loss']:.4f}",
            f"ppl {record['eval_ppl']:.2f}",
            f"{record['eval_tokens']} tokens",
            f"{record['eval_time_s']:.2f} s",
        ]
        if record.get("eval_tokens_per_s"):
            parts.append(f"{record['eval_tokens_per_s']:.0f} tok/s")
    if "passkey_accuracy" in record:
        parts.append(f"passkey {record['passkey_accuracy']:.0%}")
    return " | ".join(parts)


def report(out: Path, record: dict, passkey: dict | None, metrics: Any = None) -> None:
    """Write the evaluation's files and log it; `metrics` is the run's MetricsLogger (or None)."""
    out = Path(out)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    step = record["step"]
    with open(out / "eval.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    images, tables = {}, {}
    if "loss_by_position" in record:
        png = _fresh(out / "eval" / f"loss_by_position_step{step}.png")
        plot_loss_by_position([r for r in _records(out / "eval.jsonl") if "loss_by_position" in r], png)
        images["eval/loss_by_position"] = png
    if passkey is not None:
        _fresh(out / "eval" / f"passkey_step{step}.json").write_text(
            json.dumps({"step": step, **passkey}, indent=1)
        )
        png = _fresh(out / "eval" / f"passkey_step{step}.png")
        plot_passkey(passkey, step, png)
        images["eval/passkey"] = png
        cols = ["length", "depth", "passed", "key", "predicted_text"]
        tables["eval/passkey_trials"] = (cols, [[t[c] for c in cols] for t in passkey["trials"]])
    log.info(_line(record))
    if metrics is not None and hasattr(metrics, "log_eval"):
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for b in record.get("loss_by_position", []):
            scalars[f"eval/loss_pos_{_label(b['from'])}_{_label(b['to'])}"] = b["loss"]
        metrics.log_eval(step, scalars, images, tables)
