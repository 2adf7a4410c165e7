"""parallel.engine=deepspeed: ZeRO-1/2/3 (+ CPU offload) over dp x cp equals the unsharded HF model.

Parity reuses tests/test_parity.py: step-1 loss and grad norm vs the float64 HF model, 3-step losses vs a
single-process reference loop. One 4-rank group also runs a crash + `resume: auto` (identical losses,
keep-k) and the HF export, and checks that an fsdp2 checkpoint is refused with one line. The config
errors need no process group.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_distributed
from tests.test_parity import _check, _global_batches, _hf_loss, _overrides, _run_layouts, model_dirs  # noqa: F401

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install -e .[deepspeed])",
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS = ["parallel.engine=deepspeed"]
Z3_OFFLOAD = ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu", "deepspeed.cpu_adam=false"]
EXPORT = ["checkpoint.export_hf=true", "checkpoint.export_dtype=float32"]

LAYOUTS = [
    ("ds-z2-dp2-cp2-ring", "llama", DS + ["deepspeed.zero_stage=2", "parallel.dp=2", "parallel.cp=2"]),
    ("ds-z3off-dp2-cp2-ring", "llama", DS + Z3_OFFLOAD + ["parallel.dp=2", "parallel.cp=2", *EXPORT]),
    (
        "ds-z2-cp4-ulysses-accum2",
        "llama",
        DS
        + [
            "deepspeed.zero_stage=2",
            "parallel.cp=4",
            "parallel.cp_strategy=ulysses",
            "training.grad_accum=2",
        ],
    ),
    (
        "ds-z3off-params-cp4-ulysses",
        "llama",
        DS + Z3_OFFLOAD + ["deepspeed.offload_params=cpu", "parallel.cp=4", "parallel.cp_strategy=ulysses"],
    ),
    # Tied embeddings: lm_head.weight is embed_tokens.weight, read by the chunked loss under ZeRO-3.
    (
        "ds-qwen2-z3-dp2-cp2-ulysses-ac",
        "qwen2",
        DS
        + [
            "deepspeed.zero_stage=3",
            "parallel.dp=2",
            "parallel.cp=2",
            "parallel.cp_strategy=ulysses",
            "parallel.activation_checkpointing=full",
        ],
    ),
    ("ds-z1-dp4-accum2", "llama", DS + ["deepspeed.zero_stage=1", "parallel.dp=4", "training.grad_accum=2"]),
]


class CrashAt(Exception):
    pass


def _step_dirs(root):
    # DeepSpeed also drops its zero_to_fp32.py recovery scripts next to the step directories.
    return sorted(n for n in os.listdir(root) if n.startswith("step_"))


def _resume_scenarios(rank, world, dirs, tmp):
    from trainer.config import load_config
    from trainer.trainer import Trainer

    class Crashing(Trainer):
        crash_at: int | None = None

        def train_step(self, batches):
            if self.step + 1 == self.crash_at:
                raise CrashAt(self.step + 1)  # a node dying mid-run: nothing of this step is saved
            return super().train_step(batches)

    def cfg(out, *extra):
        return load_config(
            None,
            _overrides(
                dirs["llama"],
                out,
                f"{tmp}/cache",
                [*DS, *Z3_OFFLOAD, "parallel.dp=2", "parallel.cp=2", "training.steps=4", *extra],
            ),
        )

    out = {}
    t = Trainer(cfg(f"{tmp}/ref"))
    t.train()
    out["ref"] = [h["loss"] for h in t.history]

    crash = cfg(f"{tmp}/crash", "checkpoint.interval=1", "checkpoint.keep=2", "checkpoint.resume=auto")
    t = Crashing(crash)
    t.crash_at = 4
    try:
        t.train()
    except CrashAt:
        pass
    dist.barrier()
    out["after_crash"] = _step_dirs(f"{tmp}/crash/checkpoints")
    t = Trainer(crash)
    t.train()
    out["resumed"] = [(h["step"], h["loss"]) for h in t.history]
    out["after_resume"] = _step_dirs(f"{tmp}/crash/checkpoints")

    # An fsdp2 (DCP) checkpoint is refused with one line naming the engine.
    fsdp_out = f"{tmp}/fsdp"
    fsdp = load_config(
        None,
        _overrides(
            dirs["llama"],
            fsdp_out,
            f"{tmp}/cache",
            ["parallel.dp=2", "parallel.cp=2", "training.steps=1"],
        ),
    )
    Trainer(fsdp).train()
    try:
        Trainer(cfg(fsdp_out, "checkpoint.resume=auto")).train()
        out["foreign"] = None
    except Exception as exc:  # noqa: BLE001
        out["foreign"] = f"{type(exc).__name__}: {exc}"
    return out


def _all_scenarios(rank, world, layouts, dirs, tmp):
    return {
        "parity": _run_layouts(rank, world, layouts, dirs, tmp),
        "resume": _resume_scenarios(rank, world, dirs, tmp),
    }


@pytest.fixture(scope="module")
def results(model_dirs, tmp_path_factory):  # noqa: F811
    tmp = str(tmp_path_factory.mktemp("ds"))
    return run_distributed(_all_scenarios, 4, LAYOUTS, model_dirs, tmp, timeout=900)[0], tmp


def test_parity_zero_stages_and_offload(results, model_dirs):  # noqa: F811
    out, tmp = results
    _check(out["parity"], LAYOUTS, model_dirs, tmp)


def test_hf_export_equals_reference_weights(results, model_dirs):  # noqa: F811
    """ZeRO-3 + offload export: the fp32 master weights, gathered, load with from_pretrained and equal the
    single-process reference loop's weights after the same 3 steps."""
    from transformers import AutoModelForCausalLM

    from trainer.config import load_config
    from trainer.optim import lr_factor

    out, tmp = results
    name, model, extra = LAYOUTS[1]
    cfg = load_config(None, _overrides(model_dirs[model], f"{tmp}/ref-export", f"{tmp}/cache", extra))
    exported = AutoModelForCausalLM.from_pretrained(f"{tmp}/{name}/hf", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(
        model_dirs[model], dtype=torch.float32, attn_implementation="eager"
    )
    o = cfg.optim
    opt = torch.optim.AdamW(
        ref.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, o, cfg.training.steps))
    for batches in _global_batches(cfg, 2, cfg.training.steps):
        _hf_loss(ref, batches).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.training.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
    got, want = exported.state_dict(), ref.state_dict()
    init = AutoModelForCausalLM.from_pretrained(model_dirs[model], dtype=torch.float32).state_dict()
    assert set(got) == set(want)
    # Adam turns rounding noise of near-zero gradients into updates of up to ~lr: compare at a tenth of lr,
    # against weights that moved by several lr.
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    moved = max((init[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-4 and moved > 2e-3, (worst, moved)


def test_crash_and_resume_gives_identical_losses(results):
    out = results[0]["resume"]
    assert out["after_crash"] == ["step_00000002", "step_00000003"]  # keep=2 rotated step 1 away
    assert [s for s, _ in out["resumed"]] == [4]
    assert out["resumed"][0][1] == out["ref"][3]  # bitwise: same data position, RNG, ZeRO state
    assert out["after_resume"] == ["step_00000003", "step_00000004"]


def test_fsdp2_checkpoint_is_refused_with_one_line(results):
    msg = results[0]["resume"]["foreign"]
    assert msg is not None and msg.startswith("CheckpointError:"), msg
    assert "fsdp2 engine" in msg and "parallel.engine=fsdp2" in msg and "\n" not in msg


# ---- config errors (no process group) ----------------------------------------------------------------
def _load(*overrides, tmp_path=None):
    from trainer.config import load_config

    return load_config(
        os.path.join(ROOT, "configs/demo.yaml"), [*DS, f"output_dir={tmp_path or '/tmp/x'}", *overrides]
    )


def _user_json(tmp_path, data):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return f"deepspeed.config={path}"


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["parallel.tp=2"], "parallel.tp", ["parallel.engine=fsdp2", "dp x cp"]),
        (["parallel.pp=2"], "parallel.pp", ["parallel.engine=fsdp2", "TP and PP"]),
        (
            ["deepspeed.zero_stage=2", "deepspeed.offload_params=cpu"],
            "deepspeed.offload_params",
            ["zero_stage=3"],
        ),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage", ["1 | 2 | 3"]),
        (["deepspeed.offload_optimizer=nvme"], "deepspeed.offload_optimizer", ["none | cpu"]),
        (["parallel.fsdp_cpu_offload=true"], "parallel.fsdp_cpu_offload", ["deepspeed.offload_optimizer"]),
        (["checkpoint.async_save=true"], "checkpoint.async_save", ["synchronously"]),
        (["parallel.auto=true"], "parallel.auto", ["tp/pp"]),
        (["deepspeed.config=/nonexistent/ds.json"], "deepspeed.config", ["file not found"]),
    ],
)
def test_engine_config_errors(overrides, key, words):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _load(*overrides)
    assert err.value.key == key, str(err.value)
    for w in words:
        assert w in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "data, words",
    [
        (
            {"train_micro_batch_size_per_gpu": 4},
            ["train_micro_batch_size_per_gpu=4", "training.micro_batch_size=2"],
        ),
        ({"gradient_accumulation_steps": 8}, ["gradient_accumulation_steps=8", "training.grad_accum=1"]),
        ({"gradient_clipping": 0.5}, ["gradient_clipping=0.5", "training.max_grad_norm=1.0"]),
        ({"bf16": {"enabled": True}}, ["bf16.enabled=true", 'model.dtype="float32"']),
        ({"fp16": {"enabled": True}}, ["fp16.enabled=true", "model.dtype"]),
        ({"zero_optimization": {"stage": 2}}, ["zero_optimization.stage=2", "deepspeed.zero_stage=3"]),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
            ['zero_optimization.offload_optimizer.device="cpu"', 'deepspeed.offload_optimizer="none"'],
        ),
        ({"optimizer": {"type": "Lion"}}, ['optimizer.type="Lion"', "optim.*"]),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, ["optimizer.params.lr=0.1", "optim.lr"]),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}, ["optim.scheduler"]),
        ({"zero_optimization": {"reduce_bucket_size": "auto"}}, ["zero_optimization.reduce_bucket_size"]),
    ],
)
def test_conflicting_user_json_names_both_keys(tmp_path, data, words):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _load(_user_json(tmp_path, data), tmp_path=tmp_path)
    assert err.value.key == "deepspeed.config"
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_user_json_auto_values_and_pass_through(tmp_path):
    """HF-style "auto" values take longctx's; other DeepSpeed keys pass through; train_batch_size = dp x cp."""
    from trainer.config import ConfigError
    from trainer.ds_config import build_ds_config

    data = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "stage3_prefetch_bucket_size": 1000},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": [0.9, 0.95], "weight_decay": "auto"},
        },
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto"}},
    }
    cfg = _load(
        _user_json(tmp_path, data), "model.dtype=bfloat16", "training.grad_accum=2", tmp_path=tmp_path
    )
    ds = build_ds_config(cfg, dp_cp_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 2 * 2 * 4 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"]["overlap_comm"] is True
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 1000
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "none"}
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["communication_data_type"] == "fp32"
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 12}))
    with pytest.raises(ConfigError, match="train_batch_size=12 .* conflicts .*=16"):
        build_ds_config(cfg, dp_cp_size=4)


def _never(cfg, flags):
    raise AssertionError("the run must not start")


def test_cli_exits_2_with_one_line(capsys):
    from trainer.cli import cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(
            ["--config", os.path.join(ROOT, "configs/demo.yaml"), "--dry-run", *DS, "parallel.tp=2"], _never
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: parallel.tp:"), err
