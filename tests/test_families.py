"""Model families and RoPE overrides train with parity: every case vs the unsharded transformers model.

Tiny models of each family are saved with `save_pretrained` and trained for one step through the real path
(`model.path`, plus `model.config` overrides for the RoPE cases). Step 1's loss and global grad norm must
equal those of transformers' own model (float64, sdpa) loaded from the same directory with a config built
by transformers from the same overrides, written out here by hand (independent of models/overrides.py).
Every override is also checked to change the reference loss, so a silently dropped override fails.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.dist import run_distributed
from tests.test_parity import CORPUS, TOKENIZER, _global_batches, _hf_loss

BASE = dict(
    vocab_size=695,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    initializer_range=0.1,  # larger q/k than the default 0.02: attention, hence RoPE, then moves the loss
)
MODELS = {
    "llama": dict(BASE, model_type="llama", num_key_value_heads=2),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=16, use_sliding_window=False),
    "olmo2": dict(BASE, model_type="olmo2"),
    "granite": dict(
        BASE,
        model_type="granite",
        embedding_multiplier=4.0,
        logits_scaling=3.0,
        residual_multiplier=0.6,
        attention_multiplier=0.3,
    ),
    "phi3": dict(
        BASE,
        model_type="phi3",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    ),
    # HF's Ministral always builds a sliding mask: a window no shorter than the sequence is full attention.
    "ministral": dict(BASE, model_type="ministral", sliding_window=128, head_dim=12),
    "qwen3_moe": dict(
        BASE,
        model_type="qwen3_moe",
        head_dim=8,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        use_sliding_window=False,
    ),
}

YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, rope_theta=20000.0)
LONGROPE = dict(
    rope_type="longrope",
    short_factor=[1.0, 1.1, 1.3, 1.6],
    long_factor=[1.5, 2.5, 4.0, 6.0],
    original_max_position_embeddings=48,
    rope_theta=10000.0,
)
LLAMA3 = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
    rope_theta=500000.0,
)
# name -> (trainer overrides of model.config, what transformers is given for the reference config)
ROPE = {
    "yarn": (["model.config.rope_parameters=" + json.dumps(YARN)], dict(rope_parameters=YARN)),
    "theta": (
        ["model.config.rope_theta=1000.0"],
        dict(rope_parameters=dict(rope_type="default", rope_theta=1000.0)),
    ),
    "old-keys": (
        ['model.config.rope_scaling={"type": "linear", "factor": 2.0}', "model.config.rope_theta=50000.0"],
        dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=50000.0)),
    ),
    "llama3": (["model.config.rope_parameters=" + json.dumps(LLAMA3)], dict(rope_parameters=LLAMA3)),
    # Under CP each shard's largest position differs: both types must see the global one.
    "dynamic": (
        [
            'model.config.rope_parameters={"rope_type": "dynamic", "factor": 2.0}',
            "model.config.max_position_embeddings=16",
        ],
        dict(
            rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0),
            max_position_embeddings=16,
        ),
    ),
    "longrope": (
        ["model.config.rope_parameters=" + json.dumps(LONGROPE), "model.config.max_position_embeddings=128"],
        dict(rope_parameters=LONGROPE, max_position_embeddings=128),
    ),
}
CP4 = {
    "ring": ["parallel.cp=4", "parallel.cp_strategy=ring"],
    "ulysses": ["parallel.cp=4", "parallel.cp_strategy=ulysses"],
    "hybrid": ["parallel.cp=4", "parallel.cp_strategy=hybrid", "parallel.ulysses=2"],
}
TP2CP2 = ["parallel.tp=2", "parallel.cp=2"]
PP2CP2 = ["parallel.pp=2", "parallel.cp=2"]

# (case name, model, rope override name or None, layout overrides)
CASES = [
    *[(f"llama-{r}-{s}", "llama", r, CP4[s]) for r in ("yarn", "theta", "old-keys") for s in CP4],
    ("llama-llama3-ring-contiguous", "llama", "llama3", [*CP4["ring"], "parallel.cp_layout=contiguous"]),
    ("llama-dynamic-ring", "llama", "dynamic", CP4["ring"]),
    (
        "llama-dynamic-hybrid-contiguous",
        "llama",
        "dynamic",
        [*CP4["hybrid"], "parallel.cp_layout=contiguous"],
    ),
    ("llama-longrope-ulysses", "llama", "longrope", CP4["ulysses"]),
    ("qwen3-cp4-ring", "qwen3", None, CP4["ring"]),
    ("qwen3-tp2-cp2-sequence-parallel", "qwen3", None, [*TP2CP2, "parallel.sequence_parallel=true"]),
    ("qwen3-pp2-cp2-yarn", "qwen3", "yarn", PP2CP2),
    ("olmo2-cp4-hybrid", "olmo2", None, CP4["hybrid"]),
    ("olmo2-tp2-cp2", "olmo2", None, TP2CP2),
    ("olmo2-pp2-cp2", "olmo2", None, PP2CP2),
    ("granite-cp4-ulysses", "granite", None, CP4["ulysses"]),
    ("granite-tp2-cp2", "granite", None, TP2CP2),
    ("granite-pp2-cp2", "granite", None, PP2CP2),
    ("phi3-cp4-ring", "phi3", None, CP4["ring"]),
    ("phi3-tp2-cp2-ulysses", "phi3", None, [*TP2CP2, "parallel.cp_strategy=ulysses"]),
    ("phi3-pp2-cp2", "phi3", None, PP2CP2),
    ("ministral-cp4-hybrid", "ministral", None, CP4["hybrid"]),
    ("ministral-tp2-cp2", "ministral", None, TP2CP2),
    # FSDP shards the fused experts over dp x cp: each rank assembles its experts from per-expert tensors.
    ("qwen3_moe-cp4-ring", "qwen3_moe", None, CP4["ring"]),
    ("qwen3_moe-pp2-cp2", "qwen3_moe", None, PP2CP2),
    (
        "qwen3_moe-dp2-cp2-ulysses",
        "qwen3_moe",
        None,
        ["parallel.dp=2", "parallel.cp=2", "parallel.cp_strategy=ulysses"],
    ),
]


def _overrides(model_dir: str, out_dir: str, cache_dir: str, extra: list[str]) -> list[str]:
    return [
        f"model.path={model_dir}",
        f"model.tokenizer={TOKENIZER}",
        f"data.path={CORPUS}",
        f"data.cache_dir={cache_dir}",
        "data.doc_mask=false",
        "training.seq_len=64",
        "training.micro_batch_size=2",
        "training.steps=1",
        "training.device=cpu",
        "checkpoint.export_hf=false",
        "checkpoint.resume=none",
        "logging.progress=false",
        f"output_dir={out_dir}",
        *extra,
    ]


def _case_overrides(case, model_dirs, tmp):
    name, model, rope, layout = case
    extra = [*(ROPE[rope][0] if rope else []), *layout]
    return _overrides(model_dirs[model], f"{tmp}/{name}", f"{tmp}/cache", extra)


def _run_cases(rank, world, cases, model_dirs, tmp):
    from trainer.config import load_config
    from trainer.trainer import Trainer

    out = {}
    for case in cases:
        trainer = Trainer(load_config(None, _case_overrides(case, model_dirs, tmp)))
        trainer.train()
        out[case[0]] = (trainer.history[0]["loss"], trainer.history[0]["grad_norm"])
    # The overrides travel: config.yaml and the HF export of a yarn run; a resume under another theta warns.
    yarn = ROPE["yarn"][0] + CP4["ring"] + ["checkpoint.export_hf=true"]
    Trainer(load_config(None, _overrides(model_dirs["llama"], f"{tmp}/export", f"{tmp}/cache", yarn))).train()
    theta = ["model.config.rope_theta=1000.0", *CP4["ring"], "training.steps=2", "checkpoint.resume=auto"]
    Trainer(
        load_config(None, _overrides(model_dirs["llama"], f"{tmp}/export", f"{tmp}/cache", theta))
    ).train()
    return out


def _reference(model_dir, hf_kwargs, cfg, dp_size):
    from transformers import AutoConfig, AutoModelForCausalLM

    batches = _global_batches(cfg, dp_size, 1)[0]
    config = AutoConfig.from_pretrained(model_dir, **json.loads(json.dumps(hf_kwargs)))
    moe = (
        {"experts_implementation": "eager"} if config.model_type == "qwen3_moe" else {}
    )  # grouped_mm: no fp64
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, dtype=torch.float64, attn_implementation="sdpa", **moe
    )
    loss = _hf_loss(model, batches)
    loss.backward()
    gnorm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    return loss.item(), gnorm


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    seed = int(torch.randint(0, 2**30, ()))
    print(f"model seed {seed}")
    dirs = {}
    for name, fields in MODELS.items():
        fields = dict(fields)
        torch.manual_seed(seed)  # fresh weights every run
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
        dirs[name] = str(root / name)
        model.save_pretrained(dirs[name])
    return dirs


def test_families_and_rope_overrides_parity(model_dirs, tmp_path):
    from trainer.config import load_config

    tmp = str(tmp_path)
    results = run_distributed(_run_cases, 4, CASES, model_dirs, tmp, timeout=1500)[0]
    refs, failures = {}, []
    for case in CASES:
        name, model, rope, _ = case
        cfg = load_config(None, _case_overrides(case, model_dirs, tmp))
        dp = (
            cfg.parallel.dp
            if cfg.parallel.dp != -1
            else 4 // (cfg.parallel.cp * cfg.parallel.tp * cfg.parallel.pp)
        )
        key = (model, rope, dp)
        if key not in refs:
            refs[key] = _reference(model_dirs[model], ROPE[rope][1] if rope else {}, cfg, dp)
            if rope:  # the override must matter (loss or grad norm), or this comparison proves nothing
                plain = _reference(model_dirs[model], {}, cfg, dp)
                moved = max(abs(p - r) / p for p, r in zip(plain, refs[key]))
                assert moved > 1e-4, f"{rope}: the override changes loss and grad norm by only {moved:.1e}"
        (loss, gnorm), (got_loss, got_gn) = refs[key], results[name]
        rel_loss, rel_gn = abs(got_loss - loss) / loss, abs(got_gn - gnorm) / gnorm
        if not (rel_loss <= 1e-5 and rel_gn <= 1e-5):
            failures.append(
                f"{name}: loss {got_loss:.8f} vs {loss:.8f} ({rel_loss:.1e}), "
                f"grad_norm {got_gn:.8f} vs {gnorm:.8f} ({rel_gn:.1e})"
            )
    assert not failures, "\n".join(failures)

    export = tmp_path / "export"
    exported = json.loads((export / "hf" / "config.json").read_text())
    assert exported["rope_parameters"]["rope_type"] == "yarn" and exported["rope_parameters"]["factor"] == 4.0
    assert exported["rope_parameters"]["rope_theta"] == 20000.0
    run_config = (export / "config.yaml").read_text()
    assert "rope_theta: 1000.0" in run_config  # the second (resumed) run's config.yaml
    logs = (export / "logs" / "rank0.log").read_text()
    assert "was trained with RoPE" in logs and "20000.0" in logs
