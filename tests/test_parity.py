"""Sharded training equals unsharded training: every layout vs the plain transformers model.

A tiny GQA model is saved with `save_pretrained` and loaded through the real path. For each layout the
trainer runs 3 steps; step 1's loss and global grad norm must equal those of the unsharded HF model
(float64, eager attention) on the same global batch, and all 3 losses must equal a single-process
reference loop (HF model + AdamW + the same schedule and clipping).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from tests.dist import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "configs/demo/tokenizer")
CORPUS = os.path.join(ROOT, "configs/demo/corpus.jsonl")
STEPS = 3

MODELS = {
    "llama": dict(
        model_type="llama",
        vocab_size=695,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=695,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        use_sliding_window=False,
    ),
    "mistral": dict(
        model_type="mistral",
        vocab_size=695,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        sliding_window=None,
    ),
}

# (name, model, world, overrides)
LAYOUTS_4 = [
    (
        "tp2-cp2-sequence-parallel",
        "llama",
        ["parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true"],
    ),
    (
        "cp4-hybrid-keep-attn",
        "llama",
        [
            "parallel.cp=4",
            "parallel.cp_strategy=hybrid",
            "parallel.ulysses=2",
            "parallel.activation_checkpointing=full_keep_attn",
        ],
    ),
    ("cp4-ring-zigzag", "llama", ["parallel.cp=4", "parallel.cp_strategy=ring"]),
    ("cp4-ring-contiguous", "llama", ["parallel.cp=4", "parallel.cp_layout=contiguous"]),
    ("cp4-ulysses", "llama", ["parallel.cp=4", "parallel.cp_strategy=ulysses"]),
    ("cp4-hybrid-2x2", "llama", ["parallel.cp=4", "parallel.cp_strategy=hybrid", "parallel.ulysses=2"]),
    (
        "cp4-hybrid-contiguous",
        "llama",
        [
            "parallel.cp=4",
            "parallel.cp_strategy=hybrid",
            "parallel.ulysses=2",
            "parallel.cp_layout=contiguous",
        ],
    ),
    ("dp2-cp2", "llama", ["parallel.dp=2", "parallel.cp=2"]),
    (
        "dp2-cp2-offload-tiled-mlp-ac-group",
        "llama",
        [
            "parallel.dp=2",
            "parallel.cp=2",
            "parallel.activation_offload=true",
            "parallel.mlp_chunks=4",
            "parallel.activation_checkpointing=full",
            "parallel.ac_group=2",
        ],
    ),
    ("tp2-cp2", "llama", ["parallel.tp=2", "parallel.cp=2"]),
    ("hsdp-replicate2-cp2", "llama", ["parallel.dp=2", "parallel.dp_replicate=2", "parallel.cp=2"]),
    (
        "tp2-cp2-ulysses-accum2",
        "llama",
        [
            "parallel.tp=2",
            "parallel.cp=2",
            "parallel.cp_strategy=ulysses",
            "training.grad_accum=2",
            "parallel.activation_checkpointing=full",
        ],
    ),
    ("qwen2-dp2-cp2-ulysses", "qwen2", ["parallel.dp=2", "parallel.cp=2", "parallel.cp_strategy=ulysses"]),
    ("pp2-cp2", "llama", ["parallel.pp=2", "parallel.cp=2", "training.grad_accum=2"]),
    (
        "pp2-cp2-gpipe-ulysses",
        "llama",
        [
            "parallel.pp=2",
            "parallel.cp=2",
            "parallel.cp_strategy=ulysses",
            "parallel.pp_schedule=GPipe",
            "training.micro_batch_size=1",
            "training.grad_accum=4",
        ],
    ),
    (
        "mistral-cp4-hybrid",
        "mistral",
        [
            "parallel.cp=4",
            "parallel.cp_strategy=hybrid",
            "parallel.ulysses=2",
            "parallel.activation_checkpointing=selective",
        ],
    ),
]
LAYOUTS_8 = [
    (
        "pp2-tp2-cp2-sequence-parallel",
        "llama",
        [
            "parallel.pp=2",
            "parallel.tp=2",
            "parallel.cp=2",
            "parallel.sequence_parallel=true",
            "training.grad_accum=2",
        ],
    ),
    ("dp2-tp2-cp2", "llama", ["parallel.dp=2", "parallel.tp=2", "parallel.cp=2"]),
    ("pp2-dp2-cp2", "llama", ["parallel.pp=2", "parallel.dp=2", "parallel.cp=2"]),
    (
        "pp2-tp2-cp2-hybrid",
        "llama",
        ["parallel.pp=2", "parallel.tp=2", "parallel.cp=2", "training.grad_accum=2"],
    ),
]


def _overrides(model_dir, out_dir, cache_dir, extra):
    return [
        f"model.path={model_dir}",
        f"model.tokenizer={TOKENIZER}",
        f"data.path={CORPUS}",
        f"data.cache_dir={cache_dir}",
        "data.doc_mask=false",
        "training.seq_len=64",
        "training.micro_batch_size=2",
        f"training.steps={STEPS}",
        "training.device=cpu",
        "training.max_grad_norm=1.0",
        "optim.lr=1e-3",
        "optim.warmup_steps=1",
        "checkpoint.export_hf=false",
        "checkpoint.resume=none",
        "logging.progress=false",
        f"output_dir={out_dir}",
        *extra,
    ]


def _run_layouts(rank, world, layouts, model_dirs, tmp):
    from trainer.config import load_config
    from trainer.trainer import Trainer

    out = {}
    for name, model, extra in layouts:
        cfg = load_config(None, _overrides(model_dirs[model], f"{tmp}/{name}", f"{tmp}/cache", extra))
        trainer = Trainer(cfg)
        trainer.train()
        out[name] = [(h["loss"], h["grad_norm"]) for h in trainer.history]
    return out


def _global_batches(cfg, dp_size, steps):
    """The global batch of each step, exactly as the trainer's dp ranks read it (full sequences)."""
    from trainer.data import build_dataloader, load_tokenizer

    tok = load_tokenizer(cfg)
    loaders = [build_dataloader(cfg, tok, r, dp_size, rank=0) for r in range(dp_size)]
    return [[next(ld) for ld in loaders for _ in range(cfg.training.grad_accum)] for _ in range(steps)]


def _hf_loss(model, batches):
    total, count = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        total = total + F.cross_entropy(
            logits.flatten(0, 1).double(), b["labels"].flatten(), ignore_index=-100, reduction="sum"
        )
        count += int((b["labels"] != -100).sum())
    return total / count


def _reference(model_dir, cfg, dp_size):
    """Step-1 loss/grad-norm in float64, and a 3-step single-process fp32 training loop."""
    from transformers import AutoModelForCausalLM

    from trainer.optim import lr_factor

    batches = _global_batches(cfg, dp_size, STEPS)
    m64 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="sdpa")
    loss = _hf_loss(m64, batches[0])
    loss.backward()
    gnorm = math.sqrt(
        sum(float(p.grad.double().pow(2).sum()) for p in m64.parameters() if p.grad is not None)
    )
    first = (loss.item(), gnorm)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    o = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, o, cfg.training.steps))
    losses = []
    for step in range(STEPS):
        loss = _hf_loss(model, batches[step])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return first, losses


def _check(results, layouts, model_dirs, tmp):
    from trainer.config import load_config

    refs = {}
    failures = []
    for name, model, extra in layouts:
        cfg = load_config(None, _overrides(model_dirs[model], f"{tmp}/ref", f"{tmp}/cache", extra))
        world = 8 if (name, model, extra) in LAYOUTS_8 else 4
        dp = (
            world // (cfg.parallel.cp * cfg.parallel.tp * cfg.parallel.pp)
            if cfg.parallel.dp == -1
            else cfg.parallel.dp
        )
        key = (model, dp, cfg.training.grad_accum)
        if key not in refs:
            refs[key] = _reference(model_dirs[model], cfg, dp)
        (loss1, gnorm1), losses = refs[key]
        got = results[name]
        rel_loss = abs(got[0][0] - loss1) / loss1
        rel_gn = abs(got[0][1] - gnorm1) / gnorm1
        rel_steps = max(abs(g[0] - r) / r for g, r in zip(got, losses))
        if not (rel_loss <= 1e-5 and rel_gn <= 1e-5 and rel_steps <= 1e-5 and len(got) == STEPS):
            failures.append(
                f"{name}: loss {got[0][0]:.8f} vs {loss1:.8f} ({rel_loss:.1e}), grad_norm {got[0][1]:.8f} "
                f"vs {gnorm1:.8f} ({rel_gn:.1e}), 3-step max rel {rel_steps:.1e}"
            )
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, fields in MODELS.items():
        fields = dict(fields)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        torch.manual_seed(int(torch.randint(0, 2**30, ())))  # fresh weights every run
        model = AutoModelForCausalLM.from_config(config)
        dirs[name] = str(root / name)
        model.save_pretrained(dirs[name])
    return dirs


def test_parity_4_ranks(model_dirs, tmp_path):
    results = run_distributed(_run_layouts, 4, LAYOUTS_4, model_dirs, str(tmp_path), timeout=900)[0]
    _check(results, LAYOUTS_4, model_dirs, str(tmp_path))


def test_parity_8_ranks(model_dirs, tmp_path):
    results = run_distributed(_run_layouts, 8, LAYOUTS_8, model_dirs, str(tmp_path), timeout=900)[0]
    _check(results, LAYOUTS_8, model_dirs, str(tmp_path))
