"""The planner deciding for the run: parallel.auto, parallel.cp_strategy=auto and
parallel.activation_checkpointing=auto resolve to concrete values (parallel/planner/auto.py)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from parallel.dims import ConfigError, ParallelDims
from parallel.planner import Layout, plan_rows, resolve_auto
from tests.test_planner import LLAMA_8B, ROOT, config, hf_of
from trainer.cli import dry_run
from trainer.config import Config, load_config


def test_auto_resolution():
    cfg = config(LLAMA_8B, 16384, cp_strategy="auto", cp=8)
    out = resolve_auto(cfg, 8, hf_of(cfg))
    p = out.parallel
    assert (p.cp, p.cp_strategy, p.ulysses, p.auto) == (
        8,
        "ulysses",
        1,
        False,
    ) and cfg.parallel.cp_strategy == "auto"
    assert resolve_auto(out, 8, hf_of(cfg)) is out  # nothing left to resolve
    dims = ParallelDims.from_config(p, 8)
    assert dims.ulysses == 8

    whole = config(LLAMA_8B, 131072, auto=True)
    p = resolve_auto(whole, 8, hf_of(whole)).parallel
    assert not p.auto and p.dp * p.tp * p.pp * p.cp == 8
    best = plan_rows(whole, 8, hf_of(whole))[0].layout
    assert (p.dp, p.tp, p.pp, p.cp, p.cp_strategy) == (best.dp, best.tp, best.pp, best.cp, best.strategy)

    tiny = dataclasses.replace(whole, parallel=dataclasses.replace(whole.parallel, device_memory_gib=1.0))
    with pytest.raises(ConfigError) as info:
        resolve_auto(tiny, 8, hf_of(tiny))
    assert info.value.key == "parallel.auto" and "no layout fits in 1 GiB/GPU" in str(info.value)

    # The dry run resolves auto too, on the demo config.
    demo = load_config(os.path.join(ROOT, "configs/demo.yaml"), ["parallel.cp_strategy=auto"])
    assert dry_run(demo, 4).cp == 2


def _predicted(cfg: Config, world: int, mode: str):
    """The planner's (GiB, tokens/s/GPU) for cfg's own layout with activation_checkpointing=mode."""
    trial = dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, activation_checkpointing=mode)
    )
    want = Layout(
        *(
            getattr(ParallelDims.from_config(trial.parallel, world), k)
            for k in ("dp", "tp", "pp", "cp", "ulysses")
        ),
        None,
    )
    row = next(r for r in plan_rows(trial, world, hf_of(trial)) if r.layout == want)
    return row.memory.total_gib, row.time.tokens_per_s_per_gpu


def test_auto_checkpointing_picks_the_fastest_mode_that_fits():
    """activation_checkpointing=auto, 1B shape, 65,536 tokens on one GPU: with room for everything the
    planner takes no checkpointing (no recompute); as the device shrinks it steps down to the fastest mode
    within 90% of it, and below the leanest mode it is a one-line error naming the key."""
    from parallel.planner.auto import AC_CHOICES, AC_HEADROOM

    llama_1b = dict(LLAMA_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64)
    base = config(llama_1b, 65536, ac="auto", device_memory_gib=10_000.0)
    pred = {m: _predicted(base, 1, m) for m in AC_CHOICES}
    assert max(pred, key=lambda m: pred[m][1]) == "none"
    assert pred["full"][0] < pred["full_keep_attn"][0] < pred["selective"][0] < pred["none"][0]

    def chosen(gib: float) -> str:
        cfg = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, device_memory_gib=gib))
        out = resolve_auto(cfg, 1, hf_of(cfg))
        assert resolve_auto(out, 1, hf_of(out)) is out  # nothing left to resolve
        return out.parallel.activation_checkpointing

    assert chosen(10_000.0) == "none"
    for gib in (pred["none"][0] / AC_HEADROOM * 0.99, pred["full_keep_attn"][0] / AC_HEADROOM * 1.01, 200.0):
        fitting = [m for m in AC_CHOICES if pred[m][0] <= AC_HEADROOM * gib]
        assert chosen(gib) == max(fitting, key=lambda m: pred[m][1]), (gib, pred)
    assert chosen(pred["full"][0] / AC_HEADROOM * 1.01) == "full"
    with pytest.raises(ConfigError) as info:
        chosen(pred["full"][0] / AC_HEADROOM * 0.99)
    assert info.value.key == "parallel.activation_checkpointing" and "no checkpointing mode fits" in str(
        info.value
    )

    # With parallel.auto both resolve: a concrete mode and layout.
    both = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, auto=True))
    p = resolve_auto(both, 2, hf_of(both)).parallel
    assert p.activation_checkpointing == "none" and not p.auto and p.dp * p.cp == 2
    # Offload is for checkpoints: with it, auto keeps every layer checkpointed.
    off = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, activation_offload=True))
    assert resolve_auto(off, 1, hf_of(off)).parallel.activation_checkpointing == "full_keep_attn"
    # Groups of checkpointed layers need a concrete full; the dry run resolves auto like the launch.
    with pytest.raises(ConfigError) as info:
        config(llama_1b, 65536, ac="auto", ac_group=2)
    assert info.value.key == "parallel.ac_group"
    demo = load_config(os.path.join(ROOT, "configs/demo.yaml"), ["parallel.activation_checkpointing=auto"])
    dry_run(demo, 4)


def test_config_accepts_auto():
    assert load_config(None, ["model.config={model_type: llama}", "parallel.cp_strategy=auto"])
    with pytest.raises(ConfigError) as info:
        load_config(
            None, ["model.config={model_type: llama}", "parallel.cp_strategy=auto", "parallel.ulysses=2"]
        )
    assert info.value.key == "parallel.ulysses"
    # parallel.auto replaces cp, so a cp that does not divide seq_len is not an error yet.
    assert load_config(None, ["model.config={model_type: llama}", "parallel.auto=true", "parallel.cp=3"])
    with pytest.raises(ConfigError):
        load_config(None, ["model.config={model_type: llama}", "parallel.gpus_per_node=0"])
