"""LoRA (lora.*) under context parallelism equals transformers + peft on one process.

A tiny GQA Llama is saved with `save_pretrained`; a PEFT adapter with non-zero A and B (peft initialises B
to zero, which would hide any error in B's gradient path) is made with peft itself and saved. Every layout
starts from it (`lora.adapter`): step 1's loss and the global grad norm of the adapter weights must equal
the unsharded peft model's in float64, all 3 losses a single-process fp32 AdamW loop. One 4-rank group also
checks resume, what a checkpoint holds, both exports and a bf16 base under FSDP2; two of its layouts run
the ring with compile and every memory switch (ac_group, activation_offload, mlp_chunks, full_keep_attn).
Every run builds through the trainer's meta-device path (tests/test_loading.py bounds its memory).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.dist import run_distributed
from tests.test_parity import _global_batches, _hf_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "configs/demo/tokenizer")
CORPUS = os.path.join(ROOT, "configs/demo/corpus.jsonl")
STEPS = 3
MODEL = dict(
    vocab_size=695,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (name, overrides); every layout runs on 4 ranks
LAYOUTS = [
    (
        "cp4-ring",
        ["parallel.cp=4", "checkpoint.interval=1", "checkpoint.keep=0", "checkpoint.export_hf=true"],
    ),
    ("cp4-ulysses", ["parallel.cp=4", "parallel.cp_strategy=ulysses"]),
    (
        "cp4-hybrid-keep-attn",
        [
            "parallel.cp=4",
            "parallel.cp_strategy=hybrid",
            "parallel.ulysses=2",
            "parallel.activation_checkpointing=full_keep_attn",
        ],
    ),
    (
        "dp2-cp2-ac-tiled-mlp",
        ["parallel.dp=2", "parallel.cp=2", "parallel.activation_checkpointing=full", "parallel.mlp_chunks=2"],
    ),
    ("pp2-cp2", ["parallel.pp=2", "parallel.cp=2", "training.grad_accum=2"]),
    # Every memory switch and compile on the ring (ac_group needs plain full checkpointing, hence two).
    (
        "dp2-cp2-ring-compile-ac-group-offload",
        [
            "parallel.dp=2",
            "parallel.cp=2",
            "parallel.compile=true",
            "parallel.activation_checkpointing=full",
            "parallel.ac_group=2",
            "parallel.activation_offload=true",
            "parallel.mlp_chunks=2",
        ],
    ),
    (
        "dp2-cp2-ring-compile-keep-attn-offload",
        [
            "parallel.dp=2",
            "parallel.cp=2",
            "parallel.compile=true",
            "parallel.activation_checkpointing=full_keep_attn",
            "parallel.activation_offload=true",
            "parallel.mlp_chunks=2",
        ],
    ),
]


def _overrides(dirs, out_dir, extra):
    return [
        f"model.path={dirs['base']}",
        f"model.tokenizer={TOKENIZER}",
        f"data.path={CORPUS}",
        f"data.cache_dir={dirs['tmp']}/cache",
        "data.doc_mask=false",
        "training.seq_len=64",
        "training.micro_batch_size=2",
        f"training.steps={STEPS}",
        "training.device=cpu",
        "training.max_grad_norm=0.05",  # below the first grad norms: clipping is exercised
        "optim.lr=1e-2",
        "optim.warmup_steps=1",
        "checkpoint.export_hf=false",
        "checkpoint.export_dtype=float32",
        "checkpoint.resume=none",
        "logging.progress=false",
        f"lora.adapter={dirs['adapter']}",
        f"output_dir={out_dir}",
        *extra,
    ]


def _history(trainer):
    return [(h["loss"], h["grad_norm"]) for h in trainer.history]


def _run_group(rank, world, dirs):
    import torch.distributed.checkpoint as dcp

    from trainer.config import load_config
    from trainer.trainer import Trainer

    tmp = dirs["tmp"]
    out = {}
    for name, extra in LAYOUTS:
        trainer = Trainer(load_config(None, _overrides(dirs, f"{tmp}/{name}", extra)))
        trainer.train()
        out[name] = _history(trainer)
    # Resume: a fresh trainer continues from the ring run's step-2 checkpoint and must repeat step 3 exactly.
    step2 = f"{tmp}/cp4-ring/checkpoints/step_00000002"
    resumed = Trainer(
        load_config(None, _overrides(dirs, f"{tmp}/resumed", ["parallel.cp=4", f"checkpoint.resume={step2}"]))
    )
    resumed.train()
    out["resumed"] = _history(resumed)
    out["checkpoint_keys"] = sorted(dcp.FileSystemReader(step2).read_metadata().state_dict_metadata)
    # A bf16 base (frozen, no fp32 copy) with fp32 adapters under FSDP2 over dp x cp.
    bf16 = Trainer(
        load_config(
            None,
            _overrides(
                dirs,
                f"{tmp}/bf16",
                ["parallel.dp=2", "parallel.cp=2", "model.dtype=bfloat16", "training.steps=1"],
            ),
        )
    )
    bf16.train()
    out["bf16"] = _history(bf16)
    out["bf16_dtypes"] = sorted({(str(p.dtype), p.requires_grad) for p in bf16.model.parameters()})
    out["bf16_optim_params"] = sum(len(g["params"]) for g in bf16.optimizer.param_groups)
    out["bf16_adapter_params"] = sum(1 for n, _ in bf16.model.named_parameters() if ".lora_" in n)
    return out


def _peft_model(dirs, dtype):
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=dtype, attn_implementation="eager")
    return peft.PeftModel.from_pretrained(base, dirs["adapter"], is_trainable=True).to(dtype)


def _reference(dirs, cfg, dp_size):
    """Step 1 in float64, 3 steps of fp32 AdamW with the trainer's schedule and clipping; the trained model
    is returned too (the exports must reproduce its loss)."""
    from trainer.optim import lr_factor

    batches = _global_batches(cfg, dp_size, STEPS)
    m64 = _peft_model(dirs, torch.float64)
    loss = _hf_loss(m64, batches[0])
    loss.backward()
    grads = [p.grad for n, p in m64.named_parameters() if "lora_" in n]
    assert len(grads) == 2 * len(TARGETS) * MODEL["num_hidden_layers"] and all(g is not None for g in grads)
    first = (loss.item(), math.sqrt(sum(float(g.pow(2).sum()) for g in grads)))

    model = _peft_model(dirs, torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, o, cfg.training.steps))
    losses = []
    for step in range(STEPS):
        loss = _hf_loss(model, batches[step])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.training.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return first, losses, model, batches


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A fresh random base model and a PEFT adapter on it with random (non-zero) A and B."""
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    seed = int(torch.randint(0, 2**30, ()))
    print(f"seed {seed}")
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **MODEL))
    base.save_pretrained(root / "base")
    adapted = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for name, p in adapted.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.05)  # B @ A * alpha/r ~ the base weights (std 0.02)
    adapted.save_pretrained(root / "adapter")
    return {"base": str(root / "base"), "adapter": str(root / "adapter"), "tmp": str(root)}


def test_lora_layouts_resume_export(dirs):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from trainer.config import load_config

    got = run_distributed(_run_group, 4, dirs, timeout=900)[0]
    refs, failures = {}, []
    for name, extra in LAYOUTS:
        cfg = load_config(None, _overrides(dirs, f"{dirs['tmp']}/ref", extra))
        dp = 4 // (cfg.parallel.cp * cfg.parallel.pp)
        key = (dp, cfg.training.grad_accum)
        if key not in refs:
            refs[key] = _reference(dirs, cfg, dp)
        (loss1, gnorm1), losses, _, _ = refs[key]
        hist = got[name]
        rel = (
            _rel(hist[0][0], loss1),
            _rel(hist[0][1], gnorm1),
            max(_rel(g[0], r) for g, r in zip(hist, losses)),
        )
        if len(hist) != STEPS or max(rel) > 1e-5:
            failures.append(
                f"{name}: loss {hist[0][0]:.8f} vs {loss1:.8f}, grad_norm {hist[0][1]:.8f} vs {gnorm1:.8f}, rel {rel}"
            )
    assert not failures, "\n".join(failures)

    # resume from step 2 repeats step 3 bit for bit; the checkpoint holds adapter weights and their state only
    assert got["resumed"] == got["cp4-ring"][2:], (got["resumed"], got["cp4-ring"])
    tensors = [k for k in got["checkpoint_keys"] if k.startswith(("model.", "optim.state."))]
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors), tensors[:5]
    n_adapter = 2 * len(TARGETS) * MODEL["num_hidden_layers"]
    assert len([k for k in tensors if k.startswith("model.")]) == n_adapter

    # the exports reproduce the trained model's loss: PEFT adapter on the base, and the merged HF weights alone
    _, _, trained, batches = refs[(1, 1)]
    with torch.no_grad():
        want = _hf_loss(trained, batches[0]).item()
        out = f"{dirs['tmp']}/cp4-ring"
        import peft

        base = AutoModelForCausalLM.from_pretrained(
            dirs["base"], dtype=torch.float32, attn_implementation="eager"
        )
        adapter_loss = _hf_loss(peft.PeftModel.from_pretrained(base, f"{out}/adapter"), batches[0]).item()
        merged = AutoModelForCausalLM.from_pretrained(
            f"{out}/hf", dtype=torch.float32, attn_implementation="eager"
        )
        merged_loss = _hf_loss(merged, batches[0]).item()
    assert _rel(adapter_loss, want) < 1e-5 and _rel(merged_loss, want) < 1e-5, (
        adapter_loss,
        merged_loss,
        want,
    )
    with safe_open(f"{out}/hf/model.safetensors", framework="pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    assert json.load(open(f"{out}/adapter/adapter_config.json"))["r"] == 4

    # bf16: base frozen in bf16, adapters trainable in fp32, only adapters in the optimizer; loss close to fp32
    assert got["bf16_dtypes"] == [("torch.bfloat16", False), ("torch.float32", True)], got["bf16_dtypes"]
    assert got["bf16_optim_params"] == got["bf16_adapter_params"] == n_adapter
    assert _rel(got["bf16"][0][0], refs[(2, 1)][0][0]) < 2e-2


def _cfg(dirs, *extra):
    from trainer.config import load_config

    return load_config(None, [f"model.path={dirs['base']}", "training.device=cpu", *extra])


def test_lora_config_errors(dirs, tmp_path):
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.config import ConfigError
    from trainer.lora_kind import LoraTraining

    hf_config = AutoConfig.from_pretrained(dirs["base"])

    def error(*extra, kind=True):
        with pytest.raises(ConfigError) as exc:
            cfg = _cfg(dirs, *extra)
            if kind:
                LoraTraining.from_config(cfg, hf_config)
        return exc.value.key, str(exc.value)

    assert error("lora.r=-1", kind=False)[0] == "lora.r"
    key, why = error("lora.r=8", "lora.target_modules=[q_proj,qkv_proj]")
    assert key == "lora.target_modules" and "qkv_proj" in why and "q_proj" in why
    assert error("lora.r=8", "lora.target_modules=[lm_head]")[0] == "lora.target_modules"
    assert error("lora.r=8", "parallel.tp=2", kind=False)[0] == "parallel.tp"
    assert error("lora.r=8", "parallel.engine=deepspeed", kind=False)[0] == "parallel.engine"
    assert error(f"lora.adapter={tmp_path}/missing", kind=False)[0] == "lora.adapter"
    assert error(f"lora.adapter={dirs['adapter']}", "lora.r=16")[0] == "lora.r"

    # an adapter made for another base model (wider hidden size)
    other = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("llama", **{**MODEL, "hidden_size": 32, "num_attention_heads": 4})
    )
    peft.get_peft_model(other, peft.LoraConfig(r=4, target_modules=TARGETS)).save_pretrained(
        tmp_path / "other"
    )
    key, why = error(f"lora.adapter={tmp_path}/other")
    assert key == "lora.adapter" and "another base model" in why

    # an adapter file lacking tensors its config promises: refused before any weight is read
    from safetensors.torch import load_file, save_file

    from trainer.model_build import build_stage

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_text(open(f"{dirs['adapter']}/adapter_config.json").read())
    tensors = load_file(f"{dirs['adapter']}/adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "v_proj" not in k}, partial / "adapter_model.safetensors")
    cfg = _cfg(dirs, f"lora.adapter={partial}")
    options = LoraTraining.from_config(cfg, hf_config).stage_options()
    with pytest.raises(ValueError, match=r"the adapter .*partial has no tensor for .*v_proj\.lora_A"):
        build_stage(cfg, hf_config, lambda s: None, 0, 1, torch.device("cpu"), **options)

    # the command line: one line, exit code 2, no traceback (the dry run checks LoRA against the model)
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--dry-run",
            "model.config=null",
            f"model.path={dirs['base']}",
            "lora.r=4",
            "lora.target_modules=[qkv]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "WORLD_SIZE": "4", "PYTHONPATH": ROOT},
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("config error: lora.target_modules:"), proc.stderr


def test_lora_build_freezes_base_in_model_dtype(dirs):
    """The trainer's build (meta device, then filled): base frozen in model.dtype, fp32 adapters, a new
    adapter initialised as peft does (A uniform in +-1/sqrt(in), B zero)."""
    from transformers import AutoConfig

    from trainer.lora_kind import LoraTraining
    from trainer.model_build import build_stage

    cfg = _cfg(
        dirs, "lora.r=2", "lora.alpha=4", "lora.target_modules=[q_proj,down_proj]", "model.dtype=bfloat16"
    )
    hf_config = AutoConfig.from_pretrained(dirs["base"])
    kind = LoraTraining.from_config(cfg, hf_config)
    model, _ = build_stage(cfg, hf_config, lambda s: None, 0, 1, torch.device("cpu"), **kind.stage_options())
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trained) == 2 * 2 * MODEL["num_hidden_layers"]
    assert all(".lora_" in n and p.dtype == torch.float32 for n, p in trained.items())
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    for name, p in trained.items():
        if ".lora_B." in name:
            assert not p.any(), name
        else:
            bound = 1 / math.sqrt(p.shape[1])  # kaiming_uniform(a=sqrt(5)) of an [r, in] weight
            assert 0 < p.abs().max() <= bound and p.std() > bound / 3, name
    a = [p for n, p in trained.items() if ".lora_A." in n]
    assert not torch.equal(a[0][:, :32], a[1][:, :32]), "every layer must draw its own A"
    # the base is model.path's weights, read under their HF names
    from transformers import AutoModelForCausalLM

    ref = dict(AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.bfloat16).named_parameters())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, ref[name.replace(".base_layer.", ".")]), name
    # the planner-facing FLOPs: fewer than full fine-tuning (no base weight gradients)
    from trainer.metrics import flops_per_token

    assert kind.flops_per_token(model.config, 64) < flops_per_token(model.config, 64)
