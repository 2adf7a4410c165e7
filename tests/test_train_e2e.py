"""End-to-end trainer behaviour on 4 gloo ranks (dp=2 x cp=2): exact resume after a crash or a preemption
signal, non-finite handling, W&B offline logging, HF export; plus the README's demo command itself."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(out, cache, *extra):
    from trainer.config import load_config

    return load_config(
        os.path.join(ROOT, "configs/demo.yaml"),
        [
            f"output_dir={out}",
            f"data.cache_dir={cache}",
            "training.steps=6",
            "training.seq_len=128",
            "model.config.num_hidden_layers=2",
            "logging.every=1",
            "logging.progress=false",
            "checkpoint.export_hf=false",
            "parallel.dp=2",
            "parallel.cp=2",
            *extra,
        ],
    )


class CrashAt(Exception):
    pass


def _make_trainer(cfg, crash_at=None, signal_at=None, nan_at=None):
    from trainer.trainer import Trainer

    class TestTrainer(Trainer):
        def train_step(self, batches):
            upcoming = self.step + 1
            if upcoming == crash_at:
                raise CrashAt(upcoming)  # like a node dying before the step finished: nothing saved
            if upcoming == nan_at:
                handle = self.model.register_forward_hook(lambda m, i, o: o * float("nan"))
                try:
                    return super().train_step(batches)
                finally:
                    handle.remove()
            result = super().train_step(batches)
            if signal_at and upcoming == signal_at[0]:
                os.kill(os.getpid(), signal_at[1])  # a real signal to this rank, like a scheduler sends
            return result

    return TestTrainer(cfg)


def _scenarios(rank, world, tmp):
    cache = f"{tmp}/cache"
    out = {}
    # Uninterrupted reference run.
    t = _make_trainer(_cfg(f"{tmp}/ref", cache))
    t.train()
    out["ref"] = [h["loss"] for h in t.history]

    # Resume the finished run on other layouts (DCP reshards the weights and optimizer; the data
    # position follows the global sample order): dp2·cp2 -> cp4 -> tp2·cp2 ulysses.
    t = _make_trainer(_cfg(f"{tmp}/ref", cache, "parallel.dp=1", "parallel.cp=4", "training.steps=8"))
    t.train()
    out["reshard_cp4"] = [(h["step"], h["loss"]) for h in t.history]
    t = _make_trainer(
        _cfg(
            f"{tmp}/ref",
            cache,
            "parallel.dp=1",
            "parallel.tp=2",
            "parallel.cp=2",
            "parallel.cp_strategy=ulysses",
            "training.steps=9",
        )
    )
    t.train()
    out["reshard_tp2"] = [(h["step"], h["loss"]) for h in t.history]

    # Crash before step 5 (checkpoints every 2 steps), then resume: steps 5 and 6 must be identical.
    cfg = _cfg(f"{tmp}/crash", cache, "checkpoint.interval=2")
    try:
        _make_trainer(cfg, crash_at=5).train()
    except CrashAt:
        pass
    dist.barrier()
    t = _make_trainer(cfg)
    t.train()
    out["crash_resumed_from"] = t.history[0]["step"]
    out["crash"] = [h["loss"] for h in t.history]

    # SIGTERM (and Slurm's SIGUSR1) after step 3: save, exit cleanly; the requeued run continues at step 4.
    for name, sig in (("sigterm", signal.SIGTERM), ("sigusr1", signal.SIGUSR1)):
        cfg = _cfg(f"{tmp}/{name}", cache)
        t = _make_trainer(cfg, signal_at=(3, sig))
        t.train()
        out[f"{name}_stopped_at"] = t.step
        t = _make_trainer(cfg)
        t.train()
        out[name] = [h["loss"] for h in t.history]

    # A NaN loss at step 2 stops with a message naming step and ranks; with skip_nonfinite=1 it is skipped.
    try:
        _make_trainer(_cfg(f"{tmp}/nan", cache), nan_at=2).train()
        out["nan_error"] = None
    except Exception as exc:  # noqa: BLE001
        out["nan_error"] = f"{type(exc).__name__}: {exc}"
    t = _make_trainer(_cfg(f"{tmp}/nan_skip", cache, "training.skip_nonfinite=1"), nan_at=2)
    t.train()
    out["nan_skip"] = [(h["step"], h["skipped"], h["loss"]) for h in t.history]

    # W&B (offline, for real) and the HF export, which must reproduce the trained model's loss.
    os.environ["WANDB_MODE"] = "offline"
    cfg = _cfg(
        f"{tmp}/export",
        cache,
        "training.steps=2",
        "logging.wandb=true",
        "checkpoint.export_hf=true",
        "checkpoint.export_dtype=float32",
    )
    t = _make_trainer(cfg)
    t.train()
    from parallel.cp.sharding import shard_batch
    from parallel.dims import sub_mesh

    batch = next(iter(t.loader))
    local = shard_batch(batch, t.groups.cp_size, t.groups.cp_rank, "zigzag")
    t.model.loss_scale = 1.0
    with torch.no_grad():
        loss = t.model(local["input_ids"], local["position_ids"], local["doc_ids"], local["labels"]).sum()
    dist.all_reduce(loss, group=sub_mesh(t.mesh, "cp").get_group())
    out["export"] = (loss.item(), batch)
    return out


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("e2e"))
    return run_distributed(_scenarios, 4, tmp, timeout=900)[0], tmp


def test_crash_and_resume_is_bitwise_identical(scenarios):
    out, _ = scenarios
    assert len(out["ref"]) == 6
    assert out["crash_resumed_from"] == 5  # resumed from the step-4 checkpoint
    assert out["crash"] == out["ref"][4:]


def test_resume_onto_other_layouts(scenarios):
    out, _ = scenarios
    assert [s for s, _ in out["reshard_cp4"]] == [7, 8]
    assert [s for s, _ in out["reshard_tp2"]] == [9]
    # Same weights and optimizer state carried over: training continues where it was, not from scratch.
    for _, loss in out["reshard_cp4"] + out["reshard_tp2"]:
        assert loss < out["ref"][-1] + 0.05  # keeps improving from where the run stopped


@pytest.mark.parametrize("name", ["sigterm", "sigusr1"])
def test_signal_saves_and_requeued_run_continues(scenarios, name):
    out, tmp = scenarios
    assert out[f"{name}_stopped_at"] == 3
    assert out[name] == out["ref"][3:]
    assert os.path.isfile(f"{tmp}/{name}/checkpoints/step_00000003/COMPLETE.json")


def test_nonfinite_loss_stops_or_skips(scenarios):
    out, _ = scenarios
    assert (
        out["nan_error"] is not None
        and "step 2" in out["nan_error"]
        and "rank(s) [0, 1, 2, 3]" in out["nan_error"]
    )
    steps = out["nan_skip"]
    assert [s for s, skipped, _ in steps if skipped] == [2]
    assert all(loss == loss for s, skipped, loss in steps if not skipped)


def test_wandb_offline_and_hf_export(scenarios):
    from transformers import AutoModelForCausalLM

    out, tmp = scenarios
    runs = glob.glob(f"{tmp}/export/wandb/offline-run-*/run-*.wandb")
    assert runs, "no offline W&B run written under output_dir"
    assert b"grad_norm" in open(runs[0], "rb").read()
    lines = [json.loads(x) for x in open(f"{tmp}/export/metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2] and all("tokens_per_s_per_gpu" in x for x in lines)

    trained_loss, batch = out["export"]
    model = AutoModelForCausalLM.from_pretrained(
        f"{tmp}/export/hf", dtype=torch.float32, attn_implementation="sdpa"
    )
    # doc_mask is on: the exported model must reproduce the trained document-masked loss when it sees each
    # packed document alone.
    hf_loss = 0.0
    for b in range(batch["input_ids"].shape[0]):
        for d in batch["doc_ids"][b].unique():
            idx = (batch["doc_ids"][b] == d).nonzero().flatten()
            logits = model(input_ids=batch["input_ids"][b, idx][None]).logits[0]
            hf_loss += torch.nn.functional.cross_entropy(
                logits, batch["labels"][b, idx], ignore_index=-100, reduction="sum"
            ).item()
    assert abs(hf_loss - trained_loss) / trained_loss < 1e-5, (hf_loss, trained_loss)


def test_readme_demo_command(tmp_path):
    """The README's demo command (shortened), as a new user runs it."""
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "4",
        "train.py",
        "--config",
        "configs/demo.yaml",
        "training.steps=8",
        "logging.every=1",
        f"output_dir={out}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["step"] for x in lines] == list(range(1, 9))
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.5  # visibly learning
    assert (out / "config.yaml").is_file() and (out / "hf" / "config.json").is_file()
    assert (out / "checkpoints" / "step_00000008" / "COMPLETE.json").is_file()


def _train_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python train.py --config configs/demo.yaml ARGS...` as a user types it; output captured."""
    cmd = [sys.executable, "train.py", "--config", "configs/demo.yaml", *args]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize(
    "override, expect",
    [
        ("output_dir=/etc/hostname/run", "error: output_dir /etc/hostname/run is not writable"),
        ("model.tokenizer=/nonexistent/tok", "error: model.tokenizer: could not load '/nonexistent/tok'"),
    ],
)
def test_bad_paths_fail_with_one_line(tmp_path, override, expect):
    proc = _train_cli("parallel.dp=1", "parallel.cp=1", f"output_dir={tmp_path}/out", override)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert proc.returncode == 1 and len(errors) == 1 and errors[0].startswith(expect), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_bad_config_exits_2_with_one_line(tmp_path):
    proc = _train_cli("training.setps=3", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: training.setps: unknown key (did you mean training.steps?)"
    ]
    proc = _train_cli("parallel.cp=3", "--dry-run", timeout=120, env={"WORLD_SIZE": "4"})
    assert proc.returncode == 2 and proc.stderr.startswith("config error: ")
    proc = _train_cli("parallel.dp=1", "parallel.cp=1", "model.attn_kernel=cudnn", f"output_dir={tmp_path}/k")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "config error: model.attn_kernel: attention kernel 'cudnn' runs on cuda, not cpu"
    )


def test_preprocess_flag_builds_the_cache(tmp_path):
    first = _train_cli(f"data.cache_dir={tmp_path}/cache", "--preprocess")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "data cache (built)" in first.stdout and "docs=3000" in first.stdout
    again = _train_cli(f"data.cache_dir={tmp_path}/cache", "--preprocess")
    assert again.returncode == 0 and "data cache (reused)" in again.stdout
