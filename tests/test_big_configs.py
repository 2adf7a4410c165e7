"""The shipped large-model configs at the scale they are written for, without the hardware: the 70B / 32B
configs pass --dry-run and --plan at 16 GPUs (the load check included: no rank would hold the whole model),
and bench.load's CPU smoke run loads the same weights on both of its paths."""

from __future__ import annotations

import os

import pytest

from tests.test_loading import CORPUS, ROOT, TOKENIZER

BIG_CONFIGS = {
    "llama3_70b_128k_16gpu.yaml": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
    "qwen3_32b_1m_16gpu.yaml": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=5120,
        intermediate_size=25600,
        num_hidden_layers=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=None,
    ),
}


@pytest.mark.parametrize("name", sorted(BIG_CONFIGS))
def test_big_model_configs_dry_run_and_plan(name, tmp_path, capsys):
    """The shipped 70B / 32B configs validate at 16 GPUs and the planner ranks them, load check included
    (the hub config is replaced by a local config.json of the same shape, the data and tokenizer by the
    demo's: tests never download)."""
    from transformers import AutoConfig

    import models.parallelize  # noqa: F401  (registers the families)
    from models.registry import load_hf_config
    from parallel.planner import plan_main, plan_rows
    from parallel.planner.report import current_layout
    from trainer.cli import dry_run
    from trainer.config import load_config

    fields = dict(BIG_CONFIGS[name])
    AutoConfig.for_model(fields.pop("model_type"), **fields).save_pretrained(tmp_path)
    local = [f"model.path={tmp_path}", f"model.tokenizer={TOKENIZER}", f"data.path={CORPUS}"]
    cfg = load_config(os.path.join(ROOT, "configs", name), local)
    dry_run(cfg, 16)
    hf = load_hf_config(str(tmp_path), None)
    rows = plan_rows(cfg, 16, hf)
    mine = next(r for r in rows if r.layout == current_layout(cfg, 16))
    assert mine.fits and mine.load_fits, mine.reason
    assert mine.load.gpu < mine.memory.total and mine.load.whole > 4 * 30e9
    plan_main(cfg, 16, hf)
    out = capsys.readouterr().out
    assert "load GiB" in out and "load (model.path safetensors, own slices)" in out and " * " in out


def test_load_bench_smoke_on_cpu(tmp_path):
    """bench.load runs both paths on a tiny model; same checkpoint, so the same first loss."""
    import json

    from bench.load import main

    out = tmp_path / "load.json"
    assert main(["--model", "tiny", "--device", "cpu", "--dir", str(tmp_path / "m"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["path"] for r in rows] == ["old", "new"] and all(r["error"] is None for r in rows), rows
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-6)
    assert all(r["load_time_s"] > 0 and r["load_peak_host_gib"] > 0 for r in rows)
