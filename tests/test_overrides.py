"""model.path + model.config overrides and the family checks, as a user meets them: `train.py --dry-run`
prints one `config error: <key>: ...` line and exits 2, or the plan. Configs only (no weights, no processes)."""

from __future__ import annotations

import pytest

from trainer.cli import cli_main

TINY = dict(
    vocab_size=1024,  # at least the demo tokenizer's 695 tokens (the dry run checks it)
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
CONFIGS = {
    "llama": dict(TINY, rope_theta=10000.0),
    "qwen3_moe": dict(TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "olmo2": dict(TINY),
    "gemma2": dict(TINY, head_dim=8),
    "gemma3_text": dict(TINY, head_dim=8, sliding_window=32),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("configs")
    out = {}
    for name, fields in CONFIGS.items():
        out[name] = str(root / name)
        AutoConfig.for_model(name, **fields).save_pretrained(out[name])
    return out


def _dry_run(capsys, monkeypatch, args, world=1):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    base = ["--dry-run", "model.config=null", "training.seq_len=64", "parallel.cp=1", "parallel.dp=-1"]
    try:
        code = cli_main([*base, *args], lambda cfg, flags: 0)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


REJECTED = [
    (
        "llama",
        ["model.config.hidden_size=64"],
        1,
        "config error: model.config.hidden_size: changes a weight's shape",
    ),
    ("llama", ["model.config.num_key_value_heads=4"], 1, "config error: model.config.num_key_value_heads:"),
    ("llama", ["model.config.rope_thetaa=5e5"], 1, "(did you mean rope_theta?)"),
    ("llama", ['model.config.rope_parameters={"rope_type": "yarnn"}'], 1, "(did you mean yarn?)"),
    (
        "llama",
        ['model.config.rope_parameters={"rope_type": "yarn"}'],
        1,
        "config error: model.config.rope_parameters:",
    ),
    (
        "llama",
        ['model.config.rope_scaling={"type": "linear", "factor": 0.5}'],
        1,
        "rope_scaling.factor: must be",
    ),
    ("llama", ["model.config.model_type=qwen2"], 1, "config error: model.config.model_type: 'qwen2' differs"),
    ("gemma2", [], 1, "config error: model.config.attn_logit_softcapping: gemma2 soft-caps"),
    ("gemma3_text", [], 1, "config error: model.config.model_type: 'gemma3_text' is not supported (Gemma 3 alternates"),
    (
        "qwen3_moe",
        ["parallel.tp=2"],
        2,
        "config error: parallel.tp: tensor parallelism is not implemented for Qwen3-MoE",
    ),
    (
        "qwen3_moe",
        ["model.config.output_router_logits=true"],
        1,
        "config error: model.config.output_router_logits:",
    ),
    (
        "olmo2",
        ["parallel.tp=2", "parallel.sequence_parallel=true"],
        2,
        "config error: parallel.sequence_parallel: not implemented for OLMo 2",
    ),
]


@pytest.mark.parametrize("model, args, world, expected", REJECTED, ids=[r[3][:60] for r in REJECTED])
def test_rejected_with_one_line(dirs, capsys, monkeypatch, model, args, world, expected):
    code, _, err = _dry_run(capsys, monkeypatch, [f"model.path={dirs[model]}", *args], world)
    assert code == 2 and len(err) == 1 and expected in err[0], err


def test_model_path_or_config_required(capsys, monkeypatch):
    code, _, err = _dry_run(capsys, monkeypatch, [])
    assert code == 2 and err[0].startswith("config error: model: set model.path (pretrained), model.config")


def test_inline_unsupported_family_says_why(capsys, monkeypatch):
    code, _, err = _dry_run(capsys, monkeypatch, ["model.config.model_type=gemma2"])
    assert code == 2 and "model.config.model_type" in err[0] and "soft-caps attention logits" in err[0], err


def test_override_accepted_on_the_command_line(dirs, capsys, monkeypatch):
    yarn = 'model.config.rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}'
    code, out, err = _dry_run(capsys, monkeypatch, [f"model.path={dirs['llama']}", yarn])
    assert code == 0 and "dry run OK" in out, err
    assert "rope_type: yarn" in out  # the resolved config (saved as config.yaml) holds the override


def test_pretrained_moe_accepted(dirs, capsys, monkeypatch):
    # Qwen3-MoE checkpoints load (their per-expert tensors fill the fused experts: tests/test_loading.py).
    code, out, err = _dry_run(capsys, monkeypatch, [f"model.path={dirs['qwen3_moe']}"])
    assert code == 0 and "dry run OK" in out, err


def test_rope_spellings_merge_onto_the_pretrained_config(dirs):
    from transformers import AutoConfig

    from models.overrides import apply_overrides

    base = AutoConfig.from_pretrained(dirs["llama"])
    before = dict(base.rope_parameters)
    cases = [
        ({"rope_theta": 5e5}, {"rope_type": "default", "rope_theta": 5e5}),
        ({"rope_parameters": {"rope_theta": 2e5}}, {"rope_type": "default", "rope_theta": 2e5}),
        (
            {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 3e4},
            {"rope_type": "linear", "factor": 2.0, "rope_theta": 3e4},
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4},
        ),
    ]
    for overrides, expected in cases:
        got = apply_overrides(base, overrides).rope_parameters
        assert {k: got.get(k) for k in expected} == expected, (overrides, got)
    yarn = apply_overrides(base, cases[-1][0])
    assert apply_overrides(yarn, {"rope_scaling": None}).rope_parameters == {
        "rope_type": "default",
        "rope_theta": 1e4,
    }
    assert apply_overrides(base, {"max_position_embeddings": 1024}).max_position_embeddings == 1024
    assert base.rope_parameters == before  # the pretrained config object is not changed
