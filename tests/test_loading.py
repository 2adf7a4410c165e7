"""Meta-device build and sharded loading (trainer/model_build.py, parallel/load.py), streamed export.

* `model.path`: every layout's gathered weights equal `from_pretrained` of the same bf16 directory, the
  rotary frequencies (llama3 RoPE scaling) equal the HF model's, a bare-decoder checkpoint (no `model.`
  prefix) loads, a checkpoint without a layer's tensor is refused with one line.
* `model.config`: the random init is the same at 1, 2 and 4 ranks, for every layout (and DeepSpeed
  ZeRO-3), and changes with training.seed. LoRA (lora.r > 0) with a new adapter too: its base equals the
  full fine-tuning init under the HF names, A is peft's init and B zero, identically at 1, 2 and 4 ranks.
* Memory: each of 4 ranks' peak resident memory while loading a 155M-parameter bf16 model, minus the same
  for a tiny model, stays within (fp32 model bytes / world) + largest fp32 tensor + 128 MiB, for full
  fine-tuning and for LoRA (its frozen base in model.dtype, float32 here: the whole-model build it replaced
  would exceed the bound); the streamed bf16 export raises no rank's resident memory by more than 3x the
  largest tensor + 64 MiB (< the model).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil

import pytest
import torch

from tests.dist import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "configs/demo/tokenizer")
CORPUS = os.path.join(ROOT, "configs/demo/corpus.jsonl")
HAS_DS = importlib.util.find_spec("deepspeed") is not None

SMALL = dict(
    model_type="llama",
    vocab_size=695,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    ),
)
TIED = dict(
    SMALL, model_type="qwen2", tie_word_embeddings=True, use_sliding_window=False, num_hidden_layers=2
)
# 155M parameters: 296 MiB in bf16, 0.58 GiB as fp32 masters; the embedding (and LM head) is the largest tensor.
BIG = dict(
    SMALL,
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
)
# Saved by save_pretrained with one tensor per expert (the hub's layout), loaded into fused experts.
MOE = dict(
    TIED,
    model_type="qwen3_moe",
    tie_word_embeddings=False,
    moe_intermediate_size=24,
    num_experts=4,
    num_experts_per_tok=2,
    head_dim=8,
)
TINY = dict(SMALL, num_hidden_layers=1, hidden_size=32, intermediate_size=32, num_attention_heads=4)

LORA = ["lora.r=4", "lora.alpha=8"]  # a new adapter on every projection (names starting "lora-" below)
RANDOM_LAYOUTS = {
    2: [("dp2", []), ("tp2", ["parallel.tp=2"]), ("lora-dp2", LORA), ("lora-cp2", [*LORA, "parallel.cp=2"])],
    4: [
        ("tp2-dp2", ["parallel.tp=2", "parallel.dp=2"]),
        ("pp2-cp2", ["parallel.pp=2", "parallel.cp=2", "training.grad_accum=2"]),
        ("hsdp2x2", ["parallel.dp=4", "parallel.dp_replicate=2"]),
        ("lora-pp2-cp2", [*LORA, "parallel.pp=2", "parallel.cp=2", "training.grad_accum=2"]),
    ],
}
LOAD_LAYOUTS = [
    ("tp2-dp2", ["parallel.tp=2", "parallel.dp=2"]),
    ("pp2-tp2", ["parallel.pp=2", "parallel.tp=2", "training.grad_accum=2"]),
    ("dp4-ac-tiled", ["parallel.dp=4", "parallel.activation_checkpointing=full", "parallel.mlp_chunks=2"]),
]


def _cfg(out, model, extra):
    from trainer.config import load_config

    source = [f"model.path={model}"] if isinstance(model, str) else [f"model.config={model}"]
    return load_config(
        None,
        [
            "model.config=null",
            *source,
            f"model.tokenizer={TOKENIZER}",
            f"data.path={CORPUS}",
            f"data.cache_dir={out}/../cache",
            "training.seq_len=64",
            "training.device=cpu",
            "checkpoint.export_hf=false",
            "checkpoint.resume=none",
            "logging.progress=false",
            f"output_dir={out}",
            *extra,
        ],
    )


def _full_weights(trainer) -> dict[str, torch.Tensor]:
    """Collective: this rank's stage gathered to full fp32 tensors (ZeRO-3 partitions or DTensor shards)."""
    out = {}
    for name, p in trainer.model.named_parameters():
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().float().clone()
        else:
            out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone()
    out.update({f"buffer:{n}": b.clone() for n, b in trainer.model.named_buffers()})
    return out


def _random_layouts(rank, world, layouts, tmp):
    from trainer.trainer import Trainer

    out = {}
    for name, extra in layouts:
        out[name] = _full_weights(Trainer(_cfg(f"{tmp}/{name}", SMALL, extra)))
    return out


def _merge(per_rank: list[dict]) -> dict:
    """Union of every rank's gathered stage (pipeline stages hold different layers)."""
    merged: dict = {}
    for result in per_rank:
        for layout, weights in result.items():
            merged.setdefault(layout, {}).update(weights)
    return merged


def _reference_random(seed: int = 0, extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """One process, no process group, no parallelism: the same build and init the trainer uses (`extra`
    overrides: the training kind's build, e.g. LoRA)."""
    from models.registry import load_hf_config
    from trainer.config import load_config
    from trainer.model_build import build_stage
    from trainer.training_kind import training_kind

    cfg = load_config(None, ["model.config=" + str(SMALL), f"training.seed={seed}", *extra])
    hf_config = load_hf_config(None, SMALL)
    options = training_kind(cfg, hf_config).stage_options()
    stage, _ = build_stage(cfg, hf_config, lambda s: None, 0, 1, torch.device("cpu"), **options)
    weights = {n: p.detach().clone() for n, p in stage.named_parameters()}
    weights.update({f"buffer:{n}": b.clone() for n, b in stage.named_buffers()})
    return weights


def _assert_same(got: dict, ref: dict, what: str) -> None:
    assert set(got) == set(ref), f"{what}: names differ: {set(got) ^ set(ref)}"
    for name, value in ref.items():
        assert torch.equal(got[name], value), f"{what}: {name} differs"


def _references() -> tuple[dict, dict]:
    """World 1: full fine-tuning's random init, and LoRA's (checked here against it and against peft's
    init rule, so the layouts need only equal it)."""
    full, lora = _reference_random(), _reference_random(extra=tuple(LORA))
    adapters = {n: v for n, v in lora.items() if ".lora_" in n}
    assert len(adapters) == 2 * 7 * SMALL["num_hidden_layers"]
    _assert_same(
        {n.replace(".base_layer.", "."): v for n, v in lora.items() if n not in adapters}, full, "base"
    )
    for name, value in adapters.items():
        if ".lora_B." in name:
            assert not value.any(), name  # peft starts B at zero: the adapted model is the base
        else:  # kaiming_uniform(a=sqrt(5)) on [r, in]: uniform in +-1/sqrt(in)
            bound = 1 / value.shape[1] ** 0.5
            assert value.dtype == torch.float32 and 0 < value.abs().max() <= bound, name
    return full, lora


def _assert_layouts(results: dict, refs: tuple[dict, dict], what: str) -> None:
    for layout, weights in results.items():
        _assert_same(weights, refs[layout.startswith("lora-")], f"{what}, {layout}")


def test_random_init_same_weights_at_1_and_2_ranks(tmp_path):
    refs = _references()
    ref = refs[0]
    other_seed = _reference_random(seed=1)
    assert not torch.equal(
        ref["model.layers.0.mlp.up_proj.weight"], other_seed["model.layers.0.mlp.up_proj.weight"]
    )
    # The family's own init: N(0, initializer_range) for projections and embeddings, ones for the norms.
    w = torch.cat([ref[f"model.layers.{i}.mlp.down_proj.weight"].flatten() for i in range(4)])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(ref["model.norm.weight"], torch.ones(64))
    results = _merge(run_distributed(_random_layouts, 2, RANDOM_LAYOUTS[2], str(tmp_path)))
    _assert_layouts(results, refs, "random init, 2 ranks")


def _write_models(root) -> dict[str, str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    dirs = {}
    for name, fields in (("small", SMALL), ("tied", TIED), ("big", BIG), ("tiny", TINY), ("moe", MOE)):
        fields = dict(fields)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        torch.manual_seed(int(torch.randint(0, 2**30, ())))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        dirs[name] = str(root / name)
        model.save_pretrained(dirs[name])
        del model
    # The bare decoder's names (no `model.` prefix) and a checkpoint missing one layer's tensor.
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(dirs["small"], "model.safetensors"))
    for name, edit in (
        ("bare", lambda k: k.removeprefix("model.")),
        ("broken", lambda k: None if k == "model.layers.1.mlp.up_proj.weight" else k),
    ):
        dirs[name] = str(root / name)
        os.makedirs(dirs[name])
        save_file(
            {edit(k): v for k, v in sd.items() if edit(k)}, os.path.join(dirs[name], "model.safetensors")
        )
        shutil.copy(os.path.join(dirs["small"], "config.json"), dirs[name])
    # A MoE checkpoint missing one expert's tensor.
    moe = load_file(os.path.join(dirs["moe"], "model.safetensors"))
    dirs["moe-broken"] = str(root / "moe-broken")
    os.makedirs(dirs["moe-broken"])
    lost = "model.layers.1.mlp.experts.3.gate_proj.weight"
    save_file(
        {k: v for k, v in moe.items() if k != lost}, os.path.join(dirs["moe-broken"], "model.safetensors")
    )
    shutil.copy(os.path.join(dirs["moe"], "config.json"), dirs["moe-broken"])
    # A file cut short (a partial download) and one whose header is not JSON.
    for name, edit in (("truncated", lambda b: b[:-100]), ("corrupt", lambda b: b[:8] + b"#" * 16 + b[24:])):
        dirs[name] = str(root / name)
        shutil.copytree(dirs["small"], dirs[name])
        path = os.path.join(dirs[name], "model.safetensors")
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(edit(data))
    return dirs


def _four_ranks(rank, world, dirs, tmp):
    from trainer.errors import ModelLoadError
    from trainer.hf_export import export_hf
    from trainer.model_build import _reset_host_peak, host_peak_bytes
    from trainer.trainer import Trainer

    out = {"memory": {}}
    # Memory first, before other models' allocations linger in the heap.
    for name, model, extra in (("tiny", "tiny", []), ("big", "big", []), ("lora", "big", LORA)):
        t = Trainer(_cfg(f"{tmp}/mem-{name}", dirs[model], ["parallel.dp=4", *extra]))
        out["memory"][name] = t.stage_loader.stats["load_peak_host_gib"] * 2**30
        if name == "big":  # the streamed export's transient memory above what the rank already holds
            _reset_host_peak()
            base = host_peak_bytes()
            export_hf([t.model], t.hf_config, None, f"{tmp}/export", "bfloat16", shard_bytes=100 * 2**20)
            out["memory"]["export"] = host_peak_bytes() - base
        del t
        gc.collect()
    for name, extra in LOAD_LAYOUTS:
        out[f"load:{name}"] = _full_weights(Trainer(_cfg(f"{tmp}/{name}", dirs["small"], extra)))
    out["load:bare"] = _full_weights(Trainer(_cfg(f"{tmp}/bare", dirs["bare"], ["parallel.dp=4"])))
    out["load:tied"] = _full_weights(
        Trainer(_cfg(f"{tmp}/tied", dirs["tied"], ["parallel.tp=2", "parallel.dp=2"]))
    )
    # FSDP2 shards the fused experts' dim 0 over dp x cp: one expert per rank, from its own tensors.
    out["load:moe"] = _full_weights(
        Trainer(_cfg(f"{tmp}/moe", dirs["moe"], ["parallel.dp=2", "parallel.cp=2"]))
    )
    for bad in ("broken", "truncated", "corrupt", "moe-broken"):
        try:
            Trainer(_cfg(f"{tmp}/{bad}", dirs[bad], ["parallel.dp=4"]))
            out[bad] = None
        except ModelLoadError as exc:
            out[bad] = str(exc)
    out.update(_random_layouts(rank, world, RANDOM_LAYOUTS[4], tmp))
    if HAS_DS:
        ds = ["parallel.engine=deepspeed", "deepspeed.zero_stage=3", "parallel.dp=2", "parallel.cp=2"]
        out["ds-z3"] = _full_weights(Trainer(_cfg(f"{tmp}/ds", SMALL, ds)))
        out["load:moe-ds"] = _full_weights(Trainer(_cfg(f"{tmp}/moe-ds", dirs["moe"], ds)))
    return out


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    dirs = _write_models(tmp_path_factory.mktemp("models"))
    per_rank = run_distributed(_four_ranks, 4, dirs, str(tmp_path_factory.mktemp("runs")), timeout=900)
    return per_rank, dirs


def test_load_from_safetensors_equals_from_pretrained(four):
    from transformers import AutoModelForCausalLM

    per_rank, dirs = four
    merged = _merge([{k: v for k, v in r.items() if k.startswith("load:")} for r in per_rank])
    cases = [*((n, "small") for n, _ in LOAD_LAYOUTS), ("bare", "small"), ("tied", "tied"), ("moe", "moe")]
    cases += [("moe-ds", "moe")] if HAS_DS else []
    for name, model in cases:
        hf = AutoModelForCausalLM.from_pretrained(dirs[model], dtype=torch.float32)
        ref = {n: p.detach() for n, p in hf.named_parameters()}  # a tied lm_head appears once
        ref.update({f"buffer:{n}": b for n, b in hf.named_buffers() if n.startswith("model.rotary_emb.")})
        got = merged[f"load:{name}"]
        if model == "tied":
            got = {k: v for k, v in got.items() if k != "lm_head.weight"}
        _assert_same(got, ref, f"load {name}")
    broken = per_rank[0]["broken"]
    assert broken is not None and "\n" not in broken and "model.layers.1.mlp.up_proj.weight" in broken, broken
    for bad, why in (
        ("moe-broken", "has no tensor for model.layers.1.mlp.experts.3.gate_proj.weight"),
        ("truncated", "model.safetensors: truncated"),
        ("corrupt", "model.safetensors: not a safetensors"),
    ):
        for message in (r[bad] for r in per_rank):
            assert message is not None and "\n" not in message and why in message, message


def test_random_init_same_weights_at_4_ranks(four):
    per_rank, _ = four
    skip = ("memory", "broken", "truncated", "corrupt", "moe-broken")
    merged = _merge(
        [{k: v for k, v in r.items() if k not in skip and not k.startswith("load:")} for r in per_rank]
    )
    layouts = [n for n, _ in RANDOM_LAYOUTS[4]] + (["ds-z3"] if HAS_DS else [])
    _assert_layouts({n: merged[n] for n in layouts}, _references(), "random init, 4 ranks")


def test_load_memory_bound_per_rank(four):
    from transformers import AutoConfig

    per_rank, _ = four
    fields = dict(BIG)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    h, v, i, n = config.hidden_size, config.vocab_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    params = 2 * v * h + h + n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)
    fp32_bytes, largest = 4 * params, 4 * v * h
    bound = fp32_bytes / 4 + largest + 128 * 2**20
    assert bound < fp32_bytes  # a whole fp32 model on a rank would fail this test
    for rank, result in enumerate(per_rank):
        for kind in (
            "big",
            "lora",
        ):  # full fine-tuning; LoRA (base frozen in float32, r=4 on every projection)
            extra = result["memory"][kind] - result["memory"]["tiny"]
            print(
                f"rank {rank} {kind}: load peak {result['memory'][kind] / 2**30:.2f} GiB, {extra / 2**30:.2f} GiB "
                f"above the tiny model; bound {bound / 2**30:.2f} GiB (model {fp32_bytes / 2**30:.2f} GiB fp32)"
            )
            assert extra <= bound, f"rank {rank} {kind}: {extra / 2**30:.2f} GiB > {bound / 2**30:.2f} GiB"
    # Export in bf16: one tensor in flight - the gathered tensor, the collective's staging copy, and the
    # allocator's hold on the previous one of the same size (embedding, then LM head) - never the whole
    # model (296 MiB here; measured 158-171 MiB per rank).
    export_bound = 3 * largest / 2 + 64 * 2**20
    assert export_bound < fp32_bytes / 2
    for rank, result in enumerate(per_rank):
        grown = result["memory"]["export"]
        print(
            f"rank {rank}: export peak {grown / 2**20:.0f} MiB above its resident set (bound {export_bound / 2**20:.0f})"
        )
        assert grown <= export_bound, f"rank {rank}: export took {grown / 2**20:.0f} MiB"
