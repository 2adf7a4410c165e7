"""Packed documents under CP: every document is computed exactly as if the model saw it alone.

A packed batch (several documents per sequence, doc_mask on) goes through the CP model at cp=4 for ring,
Ulysses and hybrid; the gathered final hidden states of each document must equal the HF model run on that
document by itself, and the summed loss must equal the sum of the per-document losses.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.dist import run_distributed

CONFIG = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def _packed_batch(gen, seq_len=64, batch=2):
    """Documents of random unequal lengths that fit whole in each sequence; labels shifted inside each doc."""
    from trainer.data.packing import pack_documents

    rows = []
    for _ in range(batch):
        lengths, left = [], seq_len + 1
        while left > 4:
            n = int(torch.randint(3, min(24, left) + 1, (), generator=gen))
            lengths.append(n)
            left -= n
        lengths[-1] += left  # fill the window exactly (S + 1 tokens for next-token labels)
        docs = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in lengths]
        packed = pack_documents(docs, seq_len, doc_mask=True)
        rows.append({k: torch.as_tensor(v) for k, v in packed[0].items()})
    return {k: torch.stack([r[k] for r in rows]).long() for k in rows[0]}


def _check(rank, world, seed):
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.attention import register
    from models.causal_lm import CausalLMStage
    from parallel.cp.api import apply_cp
    from parallel.cp.sharding import gather, shard_batch

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ref_model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="sdpa")).double()
    batch = _packed_batch(gen)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    groups = {
        "ring": (dist.group.WORLD, None),
        "ulysses": (None, dist.group.WORLD),
        "hybrid": (mesh["ring"].get_group(), mesh["ulysses"].get_group()),
    }
    register()
    results = {}
    for name, (ring_g, uly_g) in groups.items():
        model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="longctx")).double()
        model.load_state_dict(ref_model.state_dict())
        stage = CausalLMStage(model)
        apply_cp(stage, ring_g, uly_g, layout="zigzag")
        local = shard_batch(batch, world, rank, "zigzag")
        hidden = stage(local["input_ids"], local["position_ids"], local["doc_ids"])
        loss = stage(local["input_ids"], local["position_ids"], local["doc_ids"], local["labels"]).sum()
        dist.all_reduce(loss)
        full_hidden = gather(hidden.detach(), dist.group.WORLD, "zigzag")

        worst, ref_loss = 0.0, 0.0
        for b in range(batch["input_ids"].shape[0]):
            for d in batch["doc_ids"][b].unique():
                idx = (batch["doc_ids"][b] == d).nonzero().flatten()
                ids = batch["input_ids"][b, idx][None]
                alone = ref_model.model(input_ids=ids).last_hidden_state[0]
                worst = max(worst, ((full_hidden[b, idx] - alone).norm() / alone.norm()).item())
                logits = ref_model.lm_head(alone)
                ref_loss += F.cross_entropy(
                    logits, batch["labels"][b, idx], ignore_index=-100, reduction="sum"
                ).item()
        results[name] = (worst, abs(loss.item() - ref_loss) / ref_loss)
    return results


def test_packed_documents_match_documents_alone():
    seed = int(torch.randint(0, 2**30, ()))
    results = run_distributed(_check, 4, seed)[0]
    assert set(results) == {"ring", "ulysses", "hybrid"}
    for name, (hidden_err, loss_err) in results.items():
        assert hidden_err < 1e-10 and loss_err < 1e-10, (
            f"{name} (seed {seed}): hidden {hidden_err:.1e}, loss {loss_err:.1e}"
        )
