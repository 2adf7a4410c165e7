"""The memory switches change what is kept for backward, never the result: per-layer and grouped (two-level)
checkpointing, activation offload and the tiled MLP give the gradients of the plain model, and the grouped
recompute runs each layer's attention exactly once more. On a GPU, offload must also lower the peak."""

from __future__ import annotations

import pytest
import torch

LAYERS = 4


def _stage(device, seed, hidden=32, inter=64, vocab=50):
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.attention import register
    from models.causal_lm import CausalLMStage
    from parallel.cp.api import apply_cp

    register()
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="longctx",
    )
    torch.manual_seed(seed)
    stage = CausalLMStage(LlamaForCausalLM(config)).to(device)
    apply_cp(stage, None, None, layout="contiguous", kernel="math" if device == "cpu" else "auto")
    return stage


def _configure(stage, ac: bool, group: int = 1, offload: bool = False, mlp_chunks: int = 1):
    from models.causal_lm import tile_mlps

    stage.ac_layers = set(stage.model.layers.keys()) if ac else set()
    stage.ac_group, stage.offload_activations = group, offload
    tile_mlps(stage, mlp_chunks)


def _grads(device, seed, ids, **switches):
    stage = _stage(device, seed)
    _configure(stage, **switches)
    pos = torch.arange(ids.shape[1], device=device)[None]
    loss = stage(ids, pos, None, ids)
    loss.sum().backward()
    return loss.detach(), [p.grad for p in stage.parameters()]


def _count_attention_calls(fn):
    import parallel.cp.kernels as kernels

    original = kernels.KERNELS["math"]
    calls = [0]

    def counting(*a, **k):
        calls[0] += 1
        return original.forward(*a, **k)

    kernels.KERNELS["math"] = kernels.Kernel("math", counting, original.backward, "any")
    try:
        return fn(), calls[0]
    finally:
        kernels.KERNELS["math"] = original


SWITCHES = {
    "full": dict(ac=True),
    "group2": dict(ac=True, group=2),
    "group3-offload": dict(ac=True, group=3, offload=True),  # 4 layers: a group of 3 and one of 1
    "group2-offload-tiled": dict(ac=True, group=2, offload=True, mlp_chunks=4),
}


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_switch_keeps_loss_and_gradients(name):
    seed = int(torch.randint(0, 2**30, ()))
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(seed))
    (ref_loss, ref), plain_calls = _count_attention_calls(lambda: _grads("cpu", seed, ids, ac=False))
    (loss, grads), calls = _count_attention_calls(lambda: _grads("cpu", seed, ids, **SWITCHES[name]))
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # Attention forward runs per layer: once without AC, twice with per-layer AC; a group's recompute adds
    # one more for every layer but its last (the recompute stops once the last layer's input is rebuilt).
    group = SWITCHES[name].get("group", 1)
    sizes = [min(group, LAYERS - start) for start in range(0, LAYERS, group)]
    assert plain_calls == LAYERS
    assert calls == 2 * LAYERS + sum(s - 1 for s in sizes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_on_gpu_lowers_peak_and_keeps_gradients():
    seed = 1234
    ids = torch.randint(0, 50, (1, 4096), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
    peaks, results = {}, {}
    for name, sw in {
        "full": dict(ac=True),
        "offload": dict(ac=True, offload=True),
        "group": dict(ac=True, group=2, offload=True),
    }.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        stage = _stage("cuda", seed, hidden=1024, inter=2048)
        _configure(stage, **sw)
        base = torch.cuda.memory_allocated()
        pos = torch.arange(ids.shape[1], device="cuda")[None]
        loss = stage(ids, pos, None, ids)
        loss.sum().backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        results[name] = (loss.detach(), [p.grad.clone() for p in stage.parameters()])
        del stage, loss
    for name in ("offload", "group"):
        assert torch.allclose(results[name][0], results["full"][0], rtol=1e-5)
        for a, b in zip(results[name][1], results["full"][1]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert peaks["offload"] < peaks["full"], peaks
