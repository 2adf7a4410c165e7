"""Config loading, overrides, validation, save/reload, docs and the CLI front-end (no process groups)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trainer.cli import cli_main, parse_cli
from trainer.config import (
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    save_config,
)
from trainer.config_docs import config_fields, render_config_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (
    "model:\n"
    "  config: {model_type: llama, num_hidden_layers: 4, num_attention_heads: 8, num_key_value_heads: 2,\n"
    "           hidden_size: 64, intermediate_size: 128, vocab_size: 256}\n"
    "training:\n  seq_len: 256\n  steps: 7\n"
    "optim:\n  lr: 3e-4\n"
)


@pytest.fixture
def yaml_path(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(TINY)
    return str(path)


def error_of(path, overrides):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value


def test_yaml_load_types_and_defaults(yaml_path):
    cfg = load_config(yaml_path, [])
    assert cfg.training.steps == 7 and cfg.training.seq_len == 256
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(
        cfg.optim.lr, float
    )  # "3e-4" is a str in YAML 1.1
    assert cfg.model.config["num_key_value_heads"] == 2
    assert cfg.training.micro_batch_size == 1 and cfg.parallel.cp_strategy == "ring"  # defaults


def test_overrides_and_precedence(yaml_path):
    cfg = load_config(
        yaml_path,
        [
            "training.steps=10",  # CLI beats YAML
            "parallel.cp=4",
            "training.max_grad_norm=2",  # int for a float is fine
            "data.shuffle=false",
            "data.max_doc_tokens=null",
            "model.config.num_hidden_layers=2",  # free dict, keeps its other keys
            "model.config.rope_scaling.factor=2.0",  # nested dicts created on demand
            "output_dir=/tmp/x",
            "training.steps=11",  # last one wins
        ],
    )
    assert cfg.training.steps == 11 and cfg.parallel.cp == 4
    assert cfg.training.max_grad_norm == 2.0 and isinstance(cfg.training.max_grad_norm, float)
    assert cfg.data.shuffle is False and cfg.data.max_doc_tokens is None
    assert cfg.model.config["num_hidden_layers"] == 2 and cfg.model.config["hidden_size"] == 64
    assert cfg.model.config["rope_scaling"] == {"factor": 2.0}
    assert cfg.output_dir == "/tmp/x"
    # Defaults only + CLI: model via overrides alone.
    cfg = load_config(None, ["model.config={model_type: qwen2}", "training.seq_len=64"])
    assert cfg.model.config == {"model_type": "qwen2"} and cfg.training.seq_len == 64


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("training.setps=3", "training.setps", "did you mean training.steps?"),
        ("trainng.steps=3", "trainng.steps", "did you mean training.steps?"),
        ("training.cp=2", "training.cp", "did you mean parallel.cp?"),
        ("training.steps.x=1", "training.steps", "not a section"),
        ("training.steps=abc", "training.steps", "expected int"),
        ("training.steps=1.5", "training.steps", "expected int"),
        ("data.shuffle=maybe", "data.shuffle", "expected bool"),
        ("optim.lr=fast", "optim.lr", "expected float"),
        ("model.config=3", "model.config", "expected a mapping"),
        ("training.steps", "training.steps", "key=value"),
        ("training.steps=[1,", "training.steps", "cannot parse"),
    ],
)
def test_override_errors(yaml_path, override, key, words):
    err = error_of(yaml_path, [override])
    assert err.key == key and words in str(err) and str(err).startswith(f"{key}: ")


def test_yaml_unknown_key_and_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY + "parallel:\n  cp_stratgy: ring\n")
    err = error_of(str(bad), [])
    assert str(err) == "parallel.cp_stratgy: unknown key (did you mean parallel.cp_strategy?)"
    bad.write_text(TINY + "extra_section:\n  a: 1\n")
    assert error_of(str(bad), []).key == "extra_section"

    missing = str(tmp_path / "nope.yaml")
    err = error_of(missing, [])
    assert err.key == missing and "not found" in err.reason

    bad.write_text("training:\n  steps: 3\n  seq_len: [1, 2\n")
    err = error_of(str(bad), [])
    assert err.key == str(bad) and "line 4" in err.reason and "\n" not in str(err)
    bad.write_text("- 1\n- 2\n")
    assert "mapping" in error_of(str(bad), []).reason
    bad.write_text("training: 5\n")
    assert error_of(str(bad), []).key == "training"


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.dtype=fp16", "model.dtype"),
        ("model.attn_kernel=sdpa", "model.attn_kernel"),
        ("data.format=csv", "data.format"),
        ("data.on_bad_row=ignore", "data.on_bad_row"),
        ("parallel.cp_strategy=zigzag", "parallel.cp_strategy"),
        ("parallel.cp_layout=striped", "parallel.cp_layout"),
        ("parallel.pp_schedule=1f1b", "parallel.pp_schedule"),
        ("parallel.activation_checkpointing=some", "parallel.activation_checkpointing"),
        ("training.device=tpu", "training.device"),
        ("optim.scheduler=step", "optim.scheduler"),
        ("checkpoint.export_dtype=float16", "checkpoint.export_dtype"),
        ("checkpoint.resume=/does/not/exist", "checkpoint.resume"),
    ],
)
def test_enum_errors(yaml_path, override, key):
    err = error_of(yaml_path, [override])
    assert err.key == key and "must be" in err.reason


def test_enum_suggestion(yaml_path):
    assert "did you mean 1F1B?" in str(error_of(yaml_path, ["parallel.pp_schedule=1f1b"]))


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["training.steps=0"], "training.steps", ">= 1"),
        (["training.seq_len=-4"], "training.seq_len", ">= 1"),
        (["parallel.tp=0"], "parallel.tp", ">= 1"),
        (["parallel.dp=0"], "parallel.dp", "-1"),
        (["parallel.dp=4", "parallel.dp_replicate=3"], "parallel.dp_replicate", "divide"),
        (["data.max_doc_tokens=0"], "data.max_doc_tokens", ">= 1"),
        (["parallel.ac_group=0"], "parallel.ac_group", ">= 1"),
        (["parallel.ac_group=4"], "parallel.ac_group", "activation_checkpointing=full"),
        (["optim.lr=-1"], "optim.lr", ">= 0"),
        (["optim.beta2=1.0"], "optim.beta2", "[0, 1)"),
        (["optim.eps=0"], "optim.eps", "> 0"),
        (["optim.min_lr_ratio=2"], "optim.min_lr_ratio", "[0, 1]"),
        (["checkpoint.keep=-1"], "checkpoint.keep", ">= 0"),
        (["output_dir="], "output_dir", "expected str"),
        # model.path together with model.config is allowed (overrides of the pretrained config)
        (["model.config=null"], "model", "model.config (random init), or both"),
        (["model.config.model_type=gpt2"], "model.config.model_type", "llama"),
        # CP strategy / degree checks
        (
            ["parallel.cp=4", "parallel.cp_strategy=hybrid", "parallel.ulysses=1"],
            "parallel.ulysses",
            "1 < ulysses",
        ),
        (
            ["parallel.cp=4", "parallel.cp_strategy=hybrid", "parallel.ulysses=4"],
            "parallel.ulysses",
            "1 < ulysses",
        ),
        (
            ["parallel.cp=6", "parallel.cp_strategy=hybrid", "parallel.ulysses=4"],
            "parallel.ulysses",
            "cp % ulysses",
        ),
        (["parallel.cp=4", "parallel.ulysses=2"], "parallel.ulysses", "only used with cp_strategy=hybrid"),
        (
            ["parallel.cp=4", "parallel.cp_strategy=ulysses", "parallel.ulysses=2"],
            "parallel.ulysses",
            "hybrid",
        ),
        # sequence divisibility
        (["parallel.cp=3", "training.seq_len=260"], "training.seq_len", "2*cp = 6"),
        (
            ["parallel.cp=3", "parallel.cp_layout=contiguous", "training.seq_len=256"],
            "training.seq_len",
            "cp = 3",
        ),
        (["parallel.tp=3", "parallel.sequence_parallel=true"], "training.seq_len", "tp=3"),
    ],
)
def test_value_errors(yaml_path, overrides, key, words):
    err = error_of(yaml_path, overrides)
    assert err.key == key and words in err.reason, str(err)


def test_valid_parallel_combinations(yaml_path, tmp_path):
    ok = [
        ["parallel.cp=3", "parallel.cp_layout=contiguous", "training.seq_len=258"],
        ["parallel.cp=4", "parallel.cp_strategy=hybrid", "parallel.ulysses=2"],
        ["parallel.cp=4", "parallel.cp_strategy=ulysses"],
        ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.cp=2"],
        ["parallel.dp=4", "parallel.dp_replicate=2"],
        [f"checkpoint.resume={tmp_path}"],
        ["checkpoint.resume=none", "model.config.model_type=mistral"],
    ]
    for overrides in ok:
        load_config(yaml_path, overrides)


def test_save_reload_round_trip(yaml_path, tmp_path):
    cfg = load_config(yaml_path, ["parallel.cp=2", "model.config.rope_theta=500000.0", "data.cache_dir=/c"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, str(out))
    again = load_config(str(out), [])
    assert again == cfg
    text = out.read_text()
    assert text.index("model:") < text.index("data:") < text.index("parallel:") < text.index("output_dir:")
    save_config(again, str(tmp_path / "second.yaml"))
    assert (tmp_path / "second.yaml").read_text() == text  # stable output
    assert list(config_to_dict(cfg)) == [
        "model",
        "data",
        "parallel",
        "training",
        "optim",
        "checkpoint",
        "logging",
        "deepspeed",
        "eval",
        "lora",
        "output_dir",
    ]


def test_config_fields_and_docs_are_current():
    fields = {key: (tp, default, doc) for key, tp, default, doc in config_fields()}
    assert fields["training.steps"][:2] == ("int", 100)
    assert fields["model.path"][0] == "str | None" and "from_pretrained" in fields["model.path"][2]
    assert "output_dir" in fields
    missing = [key for key, (_, _, doc) in fields.items() if not doc]
    assert not missing, f"fields without a docstring: {missing}"
    with open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8") as f:
        assert f.read() == render_config_docs(), (
            "regenerate: python -m trainer.config_docs > docs/configuration.md"
        )


def test_parse_cli_flags(yaml_path):
    cfg, flags = parse_cli(
        ["--config", yaml_path, "training.steps=3", "--dry-run", "parallel.cp=2", "--plan"]
    )
    assert cfg.training.steps == 3 and cfg.parallel.cp == 2
    assert flags.dry_run and flags.plan and not flags.preprocess
    assert flags.overrides == ["training.steps=3", "parallel.cp=2"] and flags.config == yaml_path
    assert isinstance(cfg, Config)


def test_cli_main_config_error_exits_2_with_one_line(yaml_path, capsys):
    calls = []
    with pytest.raises(SystemExit) as info:
        cli_main(["--config", yaml_path, "training.setps=3"], calls.append)
    assert info.value.code == 2 and not calls
    err = capsys.readouterr().err
    assert err == "config error: training.setps: unknown key (did you mean training.steps?)\n"

    def run(cfg, flags):
        raise ConfigError("model.path", "no such model")

    with pytest.raises(SystemExit) as info:
        cli_main(["--config", yaml_path], run)
    assert info.value.code == 2 and capsys.readouterr().err == "config error: model.path: no such model\n"
    assert cli_main(["--config", yaml_path, "training.steps=2"], lambda c, f: c.training.steps) == 2


def test_cli_subprocess_exit_code_and_help(tmp_path):
    code = "import sys; from trainer.cli import cli_main; cli_main(sys.argv[1:], lambda c, f: None)"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--config", str(tmp_path / "missing.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"config error: {tmp_path / 'missing.yaml'}: config file not found"]
    proc = subprocess.run([sys.executable, "-c", code, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "parallel: dp dp_replicate" in proc.stdout and "precedence" in proc.stdout


def test_unknown_section_in_yaml_suggests_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY + "trainng:\n  steps: 3\n")
    assert str(error_of(str(bad), [])) == "trainng: unknown key (did you mean training?)"


def test_cli_dry_run_subprocess_with_world_size(yaml_path):
    code = "import sys; from trainer.cli import cli_main; sys.exit(cli_main(sys.argv[1:], lambda c, f: 1))"
    argv = ["--config", yaml_path, "parallel.dp=2", "parallel.tp=2", "parallel.cp=2", "--dry-run"]
    env = {**os.environ, "WORLD_SIZE": "8", "RANK": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "world 8 = pp 1 x dp 2 x cp 2 (ring 2 x ulysses 1) x tp 2" in proc.stdout
    assert proc.stdout.count("\n   7   0   1   1     1        0   1") == 1  # last row of the rank table
    env["WORLD_SIZE"] = "4"
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2
    assert proc.stderr == "config error: parallel.dp: dp*tp*pp*cp = 8 does not match world size 4\n"


def test_shipped_configs_are_valid():
    """Every YAML under configs/ loads and validates (the hub models themselves are not fetched)."""
    import glob

    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert len(paths) >= 3
    for path in paths:
        cfg = load_config(path, [])
        assert cfg.training.seq_len % (2 * cfg.parallel.cp) == 0, path
