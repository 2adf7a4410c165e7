"""Checkpointer: FSDP2 save/resume, rotation, partial dirs, errors, resharding 2 -> 1 ranks, HF export."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tests.dist import run_distributed
from trainer.checkpoint import (
    MARKER,
    Checkpointer,
    CheckpointError,
    capture_rng_state,
    check_writable,
    restore_rng_state,
)


def _cfg(**kw):
    base = dict(interval=0, keep=3, resume="auto", async_save=False)
    base.update(kw)
    return SimpleNamespace(**base)


class Tiny(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.inp = nn.Linear(width, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)))


def _build(world_size: int, width: int = 8):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Tiny(width)
    mesh = init_device_mesh("cpu", (world_size,))
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _train(model, opt, sched, steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed + torch.distributed.get_rank())
    for _ in range(steps):
        x = torch.randn(4, model.inp.in_features, generator=gen)
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _full(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def _opt_local(opt) -> dict[str, torch.Tensor]:
    out = {}
    for i, (_, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            out[f"{i}.{k}"] = (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
    return out


def _expect_error(fn, *needles: str) -> str:
    try:
        fn()
    except CheckpointError as exc:
        msg = str(exc)
        assert "\n" not in msg, msg
        for n in needles:
            assert n in msg, (n, msg)
        return msg
    raise AssertionError(f"no CheckpointError (wanted {needles})")


def _two_rank_checks(rank: int, world_size: int, out: str) -> dict:
    import torch.distributed as dist

    model, opt, sched = _build(world_size)
    _train(model, opt, sched, 3)
    ckpt = Checkpointer(_cfg(keep=2), out, layout={"dp": world_size}, model_config={"w": 8})
    random.seed(123 + rank)
    extra = {"data": {"epoch": 1, "offset": 10 + rank}, "rng": capture_rng_state(), "skipped": rank}
    expected_py = random.random()
    ckpt.save(3, [model], opt, sched, extra)
    ref_params, ref_opt, ref_lr = _full(model), _opt_local(opt), sched.get_last_lr()

    # perturb everything, then resume -> identical state
    _train(model, opt, sched, 2, seed=7)
    random.seed(999)
    step, got = Checkpointer(_cfg(), out).maybe_resume([model], opt, sched)
    assert step == 3 and got["data"] == extra["data"] and got["skipped"] == rank
    restore_rng_state(got["rng"])
    assert random.random() == expected_py
    for k, v in _full(model).items():
        assert torch.equal(v, ref_params[k]), k
    for k, v in _opt_local(opt).items():
        assert torch.equal(v, ref_opt[k]), k
    assert sched.get_last_lr() == ref_lr and sched.last_epoch == 3

    # keep=2 rotation: steps 3,4,5 -> only 4 and 5 remain
    ckpt.save(4, [model], opt, sched, extra)
    ckpt.save(5, [model], opt, sched, extra)
    dist.barrier()
    names = sorted(p.name for p in Path(out, "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000005"], names
    marker = json.loads(Path(out, "checkpoints", "step_00000005", MARKER).read_text())
    assert marker["world_size"] == world_size and marker["layout"] == {"dp": world_size}
    dist.barrier()  # every rank has listed the directory before rank 0 adds to it

    # a newer dir without marker (interrupted save) is ignored by auto; explicit path to it errors
    if rank == 0:
        shutil.copytree(Path(out, "checkpoints", "step_00000005"), Path(out, "checkpoints", "step_00000009"))
        Path(out, "checkpoints", "step_00000009", MARKER).unlink()
        Path(out, "checkpoints", "step_00000010.tmp").mkdir()
    dist.barrier()
    step, _ = Checkpointer(_cfg(), out).maybe_resume([model], opt, sched)
    assert step == 5
    partial = str(Path(out, "checkpoints", "step_00000009"))
    _expect_error(lambda: Checkpointer(_cfg(resume=partial), out).maybe_resume([model], opt, sched), partial)
    assert Checkpointer(_cfg(resume="none"), out).maybe_resume([model], opt, sched) is None

    # async save: completes on wait(), in-flight writes see the values at save time
    ackpt = Checkpointer(_cfg(async_save=True, keep=0), out)
    ackpt.save(6, [model], opt, sched, extra)
    at_save = _full(model)
    _train(model, opt, sched, 1, seed=3)
    ackpt.wait()
    step, _ = Checkpointer(_cfg(), out).maybe_resume([model], opt, sched)
    assert step == 6 and all(torch.equal(v, at_save[k]) for k, v in _full(model).items())

    # a model of another shape -> one-line error naming the first mismatched key
    other, oopt, osched = _build(world_size, width=6)
    _train(other, oopt, osched, 1)
    _expect_error(
        lambda: Checkpointer(_cfg(), out).maybe_resume([other], oopt, osched), "inp.weight", "[16, 8]"
    )

    # corrupt: marker present but a shard file truncated / metadata missing
    if rank == 0:
        bad = Path(out, "bad", "checkpoints", "step_00000001")
        shutil.copytree(Path(out, "checkpoints", "step_00000005"), bad)
        (bad / ".metadata").unlink()
    dist.barrier()
    _expect_error(lambda: Checkpointer(_cfg(), Path(out, "bad")).maybe_resume([model], opt, sched), "corrupt")

    Checkpointer(_cfg(keep=1), out).save(7, [model], opt, sched, extra)
    return _full(model)


def _one_rank_load(rank: int, world_size: int, out: str, expected: dict) -> None:
    model, opt, sched = _build(world_size)
    step, extra = Checkpointer(_cfg(), out).maybe_resume([model], opt, sched)
    ckpt = Checkpointer(_cfg(), out)
    assert step == 7 and extra["data"]["offset"] == 10  # rank 0's extra state when the world changed
    for k, v in _full(model).items():
        assert torch.equal(v, expected[k]), k
    # optimizer state resharded too: one more step must run
    _train(model, opt, sched, 1)
    ckpt.maybe_resume([model], opt, sched)
    assert ckpt.saved_layout["world_size"] == 2


def test_save_resume_rotate_errors_reshard(tmp_path):
    out = str(tmp_path / "run")
    full = run_distributed(_two_rank_checks, 2, out)
    assert all(torch.equal(full[0][k], full[1][k]) for k in full[0])
    run_distributed(_one_rank_load, 1, out, full[0])


def _export_checks(rank: int, world_size: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.hf_export import export_hf

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits

    # pipeline-style split: each rank holds one stage whose keys together form the HF key set
    stage = copy.deepcopy(model)
    if rank == 0:
        stage.model.layers[1], stage.model.norm, stage.lm_head = nn.Identity(), nn.Identity(), nn.Identity()
    else:
        stage.model.embed_tokens, stage.model.layers[0] = nn.Identity(), nn.Identity()
    export_hf([stage], cfg, None, out + "_pp", "float32")
    if rank == 0:
        index = json.loads(Path(out + "_pp", "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == 2
        with torch.no_grad():
            assert torch.equal(LlamaForCausalLM.from_pretrained(out + "_pp")(ids).logits, ref)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    export_hf([model], cfg, None, out, "float32")
    if rank == 0:
        assert os.path.isfile(os.path.join(out, "model.safetensors"))
        loaded = LlamaForCausalLM.from_pretrained(out)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, ref)
    export_hf([model], cfg, None, out + "_bf16", "bfloat16")
    if rank == 0:
        loaded = LlamaForCausalLM.from_pretrained(out + "_bf16")
        assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    # Small shards: several files, written by both ranks in turn, tensor by tensor, plus the index.
    export_hf([model], cfg, None, out + "_sharded", "float32", shard_bytes=20_000)
    if rank == 0:
        index = json.loads(Path(out + "_sharded", "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
        with torch.no_grad():
            assert torch.equal(LlamaForCausalLM.from_pretrained(out + "_sharded")(ids).logits, ref)


def test_export_hf_roundtrip(tmp_path):
    run_distributed(_export_checks, 2, str(tmp_path / "hf"))


def test_check_writable_and_rng(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="not writable"):
        check_writable(blocker / "sub")
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpointer(_cfg(resume=str(tmp_path / "nope")), tmp_path).maybe_resume([], [], None)
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng_state(state)
    assert a == (random.random(), np.random.rand(), torch.rand(1))


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = Checkpointer(_cfg(keep=1), tmp_path)
    ckpt.save(1, [model], opt, sched, {"k": 1})
    ref = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(*args, **kwargs):
        raise OSError("No space left on device\nsecond line")

    monkeypatch.setattr(dcp, "save", boom)
    for step in (1, 2):  # re-saving the same step and saving a newer one both fail cleanly
        msg = _expect_error(lambda s=step: ckpt.save(s, [model], opt, sched, {}), "No space left")
        assert "second line" not in msg
    monkeypatch.undo()
    with torch.no_grad():
        model.inp.weight.add_(1.0)
    step, extra = Checkpointer(_cfg(), tmp_path).maybe_resume([model], opt, sched)
    assert step == 1 and extra == {"k": 1}
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
