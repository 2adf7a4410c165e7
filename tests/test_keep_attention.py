"""activation_checkpointing=full_keep_attn: the backward's recompute reuses the kept attention output
(the kernel runs once per layer in forward, not twice) and the gradients equal plain full checkpointing -
with the layers wrapped by FSDP2 as the trainer does (its input casting once copied the CP context per
layer and silently defeated the reuse)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dist import run_distributed


def _run(rank, world, seed):
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaConfig, LlamaForCausalLM

    import parallel.cp.kernels as kernels
    from models.attention import register
    from models.causal_lm import CausalLMStage
    from parallel.cp.api import apply_cp
    from parallel.fsdp import apply_fsdp

    register()
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="longctx",
    )
    ids = torch.randint(0, 50, (1, 32), generator=torch.Generator().manual_seed(seed))
    local = ids[:, rank * 16 : (rank + 1) * 16]
    pos = torch.arange(rank * 16, (rank + 1) * 16)[None]
    original = kernels.KERNELS["math"]
    out = {}
    for keep in (False, True):
        calls = [0]

        def counting(*a, calls=calls, **k):
            calls[0] += 1
            return original.forward(*a, **k)

        kernels.KERNELS["math"] = kernels.Kernel("math", counting, original.backward, "any")
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        stage = CausalLMStage(model)
        apply_cp(stage, dist.group.WORLD, None, layout="contiguous", kernel="math")
        stage.ac_layers, stage.keep_attention = set(stage.model.layers.keys()), keep
        mesh = init_device_mesh("cpu", (world,))
        apply_fsdp(stage, list(stage.model.layers.values()), mesh, param_dtype=torch.float32)
        stage(local, pos, None, local).sum().backward()
        kernels.KERNELS["math"] = original
        out[keep] = (calls[0], [p.grad.full_tensor() for p in stage.parameters()])
    diff = max((a - b).abs().max().item() for a, b in zip(out[False][1], out[True][1]))
    return out[False][0], out[True][0], diff


def test_keep_attention_skips_the_recompute_and_keeps_gradients():
    plain, kept, diff = run_distributed(_run, 2, int(torch.randint(0, 2**30, ())))[0]
    # 2 layers x 2 ring steps of causal contiguous attention: rank 0's second step has no block, so count
    # on rank 0: forward + recompute = 2 x 2 calls with plain AC, 2 with the kept outputs.
    assert plain == 2 * kept and kept > 0
    assert diff == 0.0
