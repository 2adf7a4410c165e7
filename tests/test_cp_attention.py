"""CP attention (ring, Ulysses, hybrid) against an unsharded float64 reference: outputs and dq/dk/dv."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import parallel.cp.ring as ring
from parallel.cp.api import build_context, cp_attn_func
from parallel.cp.kernels import KERNELS, select_kernel
from parallel.cp.plan import block_mask, group_squares, padded_shape, plan_blocks, split_rows
from parallel.cp.sharding import gather, shard, shard_index, unshard
from tests.dist import run_distributed

BACKWARD_ROWS = ring.BACKWARD_ROWS


def reference_attention(q, k, v, causal, doc_ids, scale):
    """Plain float64 softmax attention on full [B, S, H, D] tensors with causal + document masks."""
    b, s, h, d = q.shape
    hkv = k.shape[2]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    kh, vh = kh.repeat_interleave(h // hkv, 1), vh.repeat_interleave(h // hkv, 1)
    scores = qh @ kh.transpose(-1, -2) * scale
    allowed = torch.ones(b, 1, s, s, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(s, s, dtype=torch.bool).tril()
    if doc_ids is not None:
        allowed &= doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ vh).transpose(1, 2)


def random_docs(b, s, gen):
    """Packed documents of unequal lengths (ids 0, 1, 2, ... in order), different per batch row."""
    rows = []
    for _ in range(b):
        cuts = sorted(torch.randperm(s - 1, generator=gen)[:3].add(1).tolist())
        ids = torch.zeros(s, dtype=torch.int64)
        for c in cuts:
            ids[c:] += 1
        rows.append(ids)
    return torch.stack(rows)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _cases(world):
    # (strategy, ulysses, causal, layout, heads, kv_heads, head_dim, batch, docs)
    cases = []
    for strategy, causal, layout in itertools.product(
        ["ring", "ulysses", "hybrid"], [True, False], ["zigzag", "contiguous"]
    ):
        if strategy == "hybrid" and world != 4:
            continue
        cases.append((strategy, causal, layout, 8, 2, 16, 2, False))  # GQA, batch 2
    for strategy in ["ring", "ulysses"] + (["hybrid"] if world == 4 else []):
        cases.append((strategy, True, "zigzag", 4, 4, 80, 1, False))  # MHA, odd head_dim
        cases.append((strategy, True, "zigzag", 4, 1, 16, 1, False))  # MQA
        cases.append((strategy, True, "zigzag", 8, 2, 16, 2, True))  # packed documents
        cases.append((strategy, True, "contiguous", 8, 2, 16, 2, True))
        cases.append((strategy, False, "zigzag", 8, 2, 16, 1, True))
    return cases


def _groups(strategy, world):
    if strategy == "ring":
        return dist.group.WORLD, None
    if strategy == "ulysses":
        return None, dist.group.WORLD
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    return mesh["ring"].get_group(), mesh["ulysses"].get_group()


def _check_all(rank, world, seed):
    results = []
    cp_rank = rank  # world group == cp group; hybrid mesh rank = ring * 2 + ulysses = global rank
    for i, (strategy, causal, layout, h, hkv, d, b, docs) in enumerate(_cases(world)):
        gen = torch.Generator().manual_seed(seed + i)
        s = 4 * world * 3  # divisible by 2*cp
        q = torch.randn(b, s, h, d, generator=gen, dtype=torch.float64)
        k = torch.randn(b, s, hkv, d, generator=gen, dtype=torch.float64)
        v = torch.randn(b, s, hkv, d, generator=gen, dtype=torch.float64)
        dout = torch.randn(b, s, h, d, generator=gen, dtype=torch.float64)
        doc_ids = random_docs(b, s, gen) if docs else None
        scale = d**-0.5

        qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
        ref = reference_attention(qr, kr, vr, causal, doc_ids, scale)
        ref.backward(dout)

        ring_g, uly_g = _groups(strategy, world)
        bf16_errs = {}
        runs = [(torch.float64, "math", "float32"), (torch.float32, "cpu_flash", "float32")]
        runs += [(torch.bfloat16, "math", "float32"), (torch.bfloat16, "math", "input")]
        runs += [(torch.float64, "math", "rows<=5")]  # backward kernel calls cut into 5-row pieces
        for run, (dtype, kernel, accum) in enumerate(runs):
            ring.BACKWARD_ROWS = 5 if accum == "rows<=5" else BACKWARD_ROWS
            # short packed documents in batched kernel calls (the GPU default) on every other run
            ring.BATCHED_SQUARE_ROWS["cpu"] = 4096 if run % 2 == 0 else 0
            ql, kl, vl = (shard(x, world, cp_rank, layout).to(dtype).requires_grad_() for x in (q, k, v))
            local_docs = shard(doc_ids, world, cp_rank, layout) if docs else None
            out = cp_attn_func(
                ql,
                kl,
                vl,
                causal=causal,
                softmax_scale=scale,
                ring_group=ring_g,
                ulysses_group=uly_g,
                layout=layout,
                doc_ids=local_docs,
                kernel=kernel,
                accum="float32" if accum == "rows<=5" else accum,
            )
            out.backward(shard(dout, world, cp_rank, layout).to(dtype))
            wg = dist.group.WORLD
            got = [gather(t.detach(), wg, layout) for t in (out, ql.grad, kl.grad, vl.grad)]
            want = [ref, qr.grad, kr.grad, vr.grad]
            errs = [rel(g, w) for g, w in zip(got, want)]
            label = (
                f"{strategy} causal={causal} {layout} h={h}/{hkv} d={d} b={b} docs={docs} {kernel} {accum}"
            )
            if dtype == torch.bfloat16:
                bf16_errs[accum] = max(errs)
                if accum == "input":  # bf16 accumulators: bf16-level error, at most a few times fp32's
                    tol = min(3e-2, 3 * bf16_errs["float32"] + 2e-3)
                    results.append((f"{label} (bf16)", max(errs), tol))
                continue
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            results.append((label, max(errs), tol))
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_cp_attention_matches_reference(world):
    seed = int(torch.randint(0, 2**30, ()).item())  # fresh inputs every run
    per_rank = run_distributed(_check_all, world, seed, timeout=600)
    bad = [(lbl, err, tol) for lbl, err, tol in per_rank[0] if not err <= tol]
    assert not bad, f"seed {seed}: " + "; ".join(f"{lbl}: {err:.2e} > {tol:.0e}" for lbl, err, tol in bad)
    assert len(per_rank[0]) >= 20


def test_sharding_roundtrip_and_errors():
    x = torch.randn(2, 48, 3)
    for cp, layout in itertools.product([1, 2, 3, 4], ["zigzag", "contiguous"]):
        shards = [shard(x, cp, r, layout) for r in range(cp)]
        assert torch.equal(unshard(shards, layout), x)
        idx = torch.cat([shard_index(48, cp, r, layout) for r in range(cp)])
        assert sorted(idx.tolist()) == list(range(48))
    assert shard_index(16, 2, 0, "zigzag").tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    with pytest.raises(ValueError, match="not divisible by 8"):
        shard(torch.randn(1, 12), 4, 0, "zigzag")
    with pytest.raises(ValueError, match="unknown CP layout"):
        shard_index(16, 2, 0, "spiral")


def test_plan_covers_exactly_the_allowed_pairs():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**30, ()).item()))
    formed = 0
    for _ in range(50):
        s = 48
        cp = 4
        docs = random_docs(1, s, gen)[0]
        for layout, causal in itertools.product(["zigzag", "contiguous"], [True, False]):
            for r, src in itertools.product(range(cp), range(cp)):
                qp, kp = shard_index(s, cp, r, layout), shard_index(s, cp, src, layout)
                plan = plan_blocks(qp, kp, docs[qp], docs[kp], causal)
                want = docs[qp][:, None] == docs[kp][None, :]
                if causal:
                    want &= qp[:, None] >= kp[None, :]
                assert torch.equal(block_mask(plan, len(qp), len(kp)), want)
                cover = torch.zeros(len(qp), len(kp), dtype=torch.int64)
                for blk in plan:
                    cover[blk.q0 : blk.q1, blk.k0 : blk.k1] += 1
                assert cover.max() <= 1, "blocks overlap"
                rows = int(torch.randint(1, 8, (), generator=gen))
                pieces = split_rows(plan, rows)
                assert all(p.q1 - p.q0 <= rows for p in pieces)
                assert torch.equal(block_mask(pieces, len(qp), len(kp)), want)
                cover.zero_()
                for blk in pieces:
                    cover[blk.q0 : blk.q1, blk.k0 : blk.k1] += 1
                assert cover.max() <= 1, "split blocks overlap"
                groups, rest = group_squares(plan, 6, 16)
                assert sorted(rest + [b for g in groups for b in g], key=str) == sorted(plan, key=str)
                formed += len(groups)
                for g in groups:  # batched calls: >= 2 causal squares of one length class, bounded padding
                    sizes = [b.q1 - b.q0 for b in g]
                    entries, rows = padded_shape(len(g), max(sizes))
                    assert len(g) >= 2 and all(b.causal and b.k1 - b.k0 == b.q1 - b.q0 for b in g)
                    assert rows // 2 < min(sizes) and max(sizes) <= min(rows, 6) and entries * rows <= 16
    assert formed > 0


def test_zigzag_plan_is_one_kernel_call_per_step():
    s, cp = 64, 4
    for r, src in itertools.product(range(cp), range(cp)):
        plan = plan_blocks(shard_index(s, cp, r, "zigzag"), shard_index(s, cp, src, "zigzag"))
        assert len(plan) == 1


def test_kernel_selection_and_errors():
    cpu = torch.device("cpu")
    assert select_kernel("auto", cpu, torch.float32, 64).name == "cpu_flash"
    assert select_kernel("auto", cpu, torch.float64, 64).name == "math"
    with pytest.raises(ValueError, match="unknown attention kernel"):
        select_kernel("fast", cpu, torch.float32, 64)
    with pytest.raises(ValueError, match="runs on cuda"):
        select_kernel("cudnn", cpu, torch.float16, 64)
    assert set(KERNELS) >= {"math", "cpu_flash", "flash", "cudnn", "flash_attn"}


def test_auto_kernel_on_each_gpu_generation(monkeypatch):
    """auto: cuDNN on Hopper+, else flash-attn when installed, else torch's flash op; math past their limits."""
    import parallel.cp.kernels as kernels

    gpu, bf16 = torch.device("cuda", 0), torch.bfloat16
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    for capability, installed, want in [
        ((9, 0), False, "cudnn"),
        ((9, 0), True, "cudnn"),
        ((8, 0), False, "flash"),
        ((8, 0), True, "flash_attn"),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(kernels, "flash_attn_available", lambda i=installed: i)
        assert select_kernel("auto", gpu, bf16, 128).name == want, (capability, installed)
        assert select_kernel("auto", gpu, bf16, 512).name == "math"
        assert select_kernel("auto", gpu, torch.float32, 64).name == "math"
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 8900)  # cuDNN 8: no fused attention
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(kernels, "flash_attn_available", lambda: False)
    assert select_kernel("auto", gpu, bf16, 128).name == "flash"


def _ulysses_errors(rank, world):
    msgs = []
    q = torch.randn(1, 8, 6, 8)  # 6 heads, degree 4
    k = torch.randn(1, 8, 3, 8)
    try:
        cp_attn_func(q, k, k, ulysses_group=dist.group.WORLD)
    except ValueError as e:
        msgs.append(str(e))
    try:
        build_context(10, ring_group=dist.group.WORLD)
    except ValueError as e:
        msgs.append(str(e))
    return msgs


def test_ulysses_and_layout_errors():
    msgs = run_distributed(_ulysses_errors, 4)[0]
    assert "hybrid" in msgs[0] and "6 query heads" in msgs[0]
    assert "not divisible" in msgs[1]
