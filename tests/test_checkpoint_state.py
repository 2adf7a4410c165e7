"""What a checkpoint holds since the small state moved into the DCP save: one save of named Stateful
entries, per-rank entries keyed by rank, nothing unpickled on resume, and checkpoints of the older layout
(train_state.pt + extra_rank<R>.pt) either loading or failing with one line naming the file."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from tests.dist import run_distributed
from trainer.checkpoint import MARKER, Checkpointer, CheckpointError
from trainer.checkpoint_state import capture_rng_state, decode, encode, restore_rng_state, run_entries


def _cfg(**kw):
    return SimpleNamespace(**{"interval": 0, "keep": 3, "resume": "auto", "async_save": False, **kw})


def _build(seed: int = 0, steps: int = 1):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(steps):
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _no_unpickling(monkeypatch) -> list:
    calls = []
    real = torch.load

    def load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        assert kwargs.get("weights_only") is not False, "an unrestricted pickle was read"
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return calls


def test_json_codec_round_trips_tensors_and_rng():
    seed = int(time.time())
    torch.manual_seed(seed)
    value = {"t": torch.randn(3, 2).double(), "b": torch.tensor([], dtype=torch.uint8), "x": [1, 2.5, None]}
    got = decode(encode(value))
    assert torch.equal(got["t"], value["t"]) and got["t"].dtype == torch.float64, seed
    assert got["b"].numel() == 0 and got["x"] == [1, 2.5, None]
    state = decode(encode(capture_rng_state()))  # tuples and numpy arrays come back as lists
    a = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng_state(state)
    assert a == (random.random(), np.random.rand(), torch.rand(1))


def test_resume_reads_no_pickle_and_keeps_all_state(tmp_path, monkeypatch):
    model, opt, sched = _build(steps=3)
    extra = {"data": {"epoch": 2, "offset": 7}, "rng": capture_rng_state(), "skipped_steps": 1}
    Checkpointer(_cfg(), tmp_path).save(4, [model], opt, sched, extra)
    step_dir = tmp_path / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in step_dir.iterdir() if not p.name.startswith("__")) == [".metadata", MARKER]
    keys = set(dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata)
    assert {"train.json", "rank.rank0"} <= keys and any(k.startswith("optim.state.") for k in keys)

    want = {k: v.clone() for k, v in model.state_dict().items()}
    other, oopt, osched = _build(seed=1)
    calls = _no_unpickling(monkeypatch)
    step, got = Checkpointer(_cfg(), tmp_path).maybe_resume([other], oopt, osched)
    assert step == 4 and got["data"] == extra["data"] and got["skipped_steps"] == 1
    assert all(torch.equal(v, want[k]) for k, v in other.state_dict().items())
    assert osched.state_dict() == sched.state_dict()
    # the optimizer's hyper-parameters (non-tensor leaves, read weights-only) come back too
    assert oopt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] != 1e-2 / 2
    assert oopt.state_dict()["state"][0]["step"] == 3
    assert calls.count(False) == 0


def _legacy_checkpoint(root: Path, model, opt, sched, extra: dict) -> Path:
    """A checkpoint as the previous layout wrote it: DCP model + optim, pickled small state beside it."""
    path = root / "checkpoints" / "step_00000003"
    entries = run_entries([model], opt, sched, lambda: 3, dict)
    dcp.save({k: entries[k] for k in ("model", "optim")}, checkpoint_id=str(path), no_dist=True)
    torch.save({"step": 3, "schedulers": [sched.state_dict()]}, path / "train_state.pt")
    torch.save(extra, path / "extra_rank0.pt")
    marker = {"step": 3, "world_size": 1, "layout": {}, "model_config_hash": None}
    (path / MARKER).write_text(json.dumps(marker))
    return path


def test_older_checkpoint_layout_loads_or_names_the_file(tmp_path, monkeypatch):
    model, opt, sched = _build(steps=3)
    extra = {"data": {"offset": 5}, "rng": capture_rng_state(), "skipped_steps": 2}
    path = _legacy_checkpoint(tmp_path, model, opt, sched, extra)
    other, oopt, osched = _build(seed=1)
    calls = _no_unpickling(monkeypatch)
    step, got = Checkpointer(_cfg(), tmp_path).maybe_resume([other], oopt, osched)
    assert step == 3 and got["data"] == {"offset": 5} and got["skipped_steps"] == 2 and calls
    assert (
        osched.state_dict() == sched.state_dict() and oopt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    )
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    monkeypatch.undo()

    torch.save({"data": {"offset": 5}, "hook": SimpleNamespace(x=1)}, path / "extra_rank0.pt")
    with pytest.raises(CheckpointError) as err:
        Checkpointer(_cfg(), tmp_path).maybe_resume([other], oopt, osched)
    assert "extra_rank0.pt" in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def _per_rank(rank: int, world: int, out: str) -> dict:
    model, opt, sched = _build()
    Checkpointer(_cfg(), out).save(2, [model], opt, sched, {"rank": rank, "rng": capture_rng_state()})
    step, got = Checkpointer(_cfg(), out).maybe_resume([model], opt, sched)
    md = dcp.FileSystemReader(f"{out}/checkpoints/step_00000002").read_metadata().state_dict_metadata
    return {"got": got["rank"], "keys": sorted(k for k in md if k.startswith(("rank.", "train.")))}


def test_per_rank_entries_are_keyed_by_rank(tmp_path):
    res = run_distributed(_per_rank, 2, str(tmp_path / "run"))
    assert [r["got"] for r in res] == [0, 1]  # each rank its own state back
    assert res[0]["keys"] == ["rank.rank0", "rank.rank1", "train.json"]
