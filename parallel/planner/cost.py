"""Predicted optimizer-step time for one layout, split by cause (docs/parallelism.md states the formulas).

Per forward/backward pass on the busiest rank (notation of memory.py; rates from calibration.py), with
T = m*Tm local tokens per pass and S = seq_len:

    matmul      6 * T * (Ls * P_mm/t + V*h) / matmul rate          (the LM head is replicated over tp)
    attention   3.5 * 2*S^2*a_r*d * Ls * sequences / c / rate(d)   causal fwd+bwd, x (2R-1)/R for a
                contiguous ring (its last rank does twice the average work; zigzag is balanced), divided
                by a block efficiency n/(n+512) for kernel calls of n query tokens (ring: Tm/2 per step)
    recompute   AC share x (layer forward matmul + attention forward) + the chunked loss' head forward
    cp comm     ring: per layer and step a KV block (2*b*Tm*k_r*d) hides behind that step's attention;
                only the excess is exposed. The fp32 dK/dV block (8*Tm*k_r*d) travels while the next
                step computes (as parallel/cp/ring.py does); only its last hop is exposed.
                Ulysses: 4 all-to-alls forward (q, k, v, out) and 4 backward, (U-1)/U of
                b*Tm*(2*a_r + 2*k_r)*d bytes, never hidden.
    fp8         training.fp8: the projections' GEMMs at the FP8 rate (calibration.py `fp8_rate`) - the weight
                gradient's at bf16's under rowwise_with_gw_hp - in all but the fp8_bf16_layers at each
                end; the LM head at bf16's. The dynamic casts add `fp8_cast_bytes` per token and
                `fp8_weight_cast_bytes` per pass to the memory-bound term; with FP8 all-gather FSDP gathers
                the projection weights at 1 byte per parameter
    tp comm     2 all-reduces forward + 2 backward per layer of b*Tm*h bytes, 2*(t-1)/t of it on the wire
    fsdp comm   all-gather (b) and reduce-scatter (fp32) of the stage's parameters, (F-1)/F of it;
                overlapped with compute except the first layer's gather
    pp bubble   (p-1)/m of the busy time = (p-1)/(m+p-1) of the step
    step        passes x the sum (grad_accum passes without PP, one pipeline pass with it)
    LoRA        frozen base: 4 instead of 6 * T * P matmul FLOPs, + 6 * T * P_adapter; only the adapters are
                reduce-scattered and stepped (parallel/planner/lora.py)

Forward communication repeats for every recomputed layer. Groups that fit in `gpus_per_node` consecutive
ranks use NVLink rates; the mesh puts tp innermost, then ulysses, ring, dp, pp (parallel/dims.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from parallel.planner.calibration import DeviceRates
from parallel.planner.enumerate import Layout
from parallel.planner.lora import adapter_layer_params
from parallel.planner.memory import ModelShape, Workload, rank_view

SMALL_BLOCK_TOKENS = 512  # assumed half-efficiency block length of the attention kernels
# parallel.compile fuses the norms, SiLU x up, RoPE and the loss chunk's softmax: the share of the memory-bound
# term (layers and loss) that remains. Fitted on 2x H100, 1B/64k (0.236 s saved of 0.495 s predicted); 3B/128k
# then predicts within 1% (docs/BENCHMARKS.md, session 4).
COMPILED_ELEMENTWISE = 0.52

PARTS = ("matmul", "attention", "recompute", "memory_bound", "cp_comm", "tp_comm", "fsdp_comm", "pp_bubble")


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, by cause; `tokens_per_s_per_gpu` is the ranking metric."""

    matmul: float
    attention: float
    recompute: float
    memory_bound: float
    cp_comm: float
    tp_comm: float
    fsdp_comm: float
    pp_bubble: float
    tokens_per_step: int
    world_size: int

    @property
    def total(self) -> float:
        return sum(getattr(self, p) for p in PARTS)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / (self.world_size * self.total)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu}


def ulysses_exchange_bytes(
    tokens: int, heads: int, kv_heads: int, head_dim: int, degree: int, nbytes: int
) -> float:
    """Bytes one rank sends per Ulysses forward (q, k, v out and the attention output back); the
    calibration's `alltoall_gibps` is measured on this very exchange (parallel/planner/calibrate.py)."""
    return nbytes * tokens * (2 * heads + 2 * kv_heads) * head_dim * (degree - 1) / degree


def group_spans(layout: Layout) -> dict[str, int]:
    """How many consecutive ranks each group's members spread over (innermost dims are contiguous)."""
    t, u, c = layout.tp, layout.ulysses, layout.cp
    return {"tp": t, "ulysses": t * u, "ring": t * c, "fsdp": t * c * layout.dp}


def fp8_cast_bytes(
    h: int, heads: int, kv_heads: int, d: int, inter: float, grad_weight_fp8: bool = True
) -> float:
    """Bytes per token and layer that torchao's dynamic FP8 casts move in one forward + backward (an
    estimate, not a measurement): each projection's input is read twice (amax, then cast) and written as
    FP8 (5 bytes per bf16 element) in the forward, its output gradient likewise in the backward, and, when
    the weight gradient's GEMM runs in FP8 (`grad_weight_fp8`), both once more (3 bytes) for its transposed
    FP8 copies."""
    ins = 5 * h + heads * d + inter  # q, k, v, gate, up read h; o reads the heads; down the MLP width
    outs = 2 * h + (heads + 2 * kv_heads) * d + 2 * inter
    return 5 * ins + 5 * outs + (3 * (ins + outs) if grad_weight_fp8 else 0)


def fp8_weight_cast_bytes(work: Workload, layout: Layout, p_mm: float, fp8_layers: float, ac: float) -> float:
    """Bytes of one forward + backward pass that torchao moves casting the FP8 layers' weights: each
    matmul casts its weight (read twice, written as FP8: 5 bytes per parameter) - the forward, its
    recompute, the input gradient's - unless training.fp8_cache_frozen cast them once (where the layout
    lets it: `Workload.fp8_cache_on`); under FP8 all-gather each rank casts only its shard. Not scaled by compile's fusion: 8B LoRA at 32k, compiled,
    saved 77 ms a step with the cache where this predicts 72 ms (docs/BENCHMARKS.md, session 8)."""
    if work.fp8_cache_on(layout):
        return 0.0
    share = 1 / (layout.dp * layout.cp) if work.fp8_all_gather else 1.0
    return (2 + ac) * 5 * p_mm * fp8_layers * share


def ac_fraction(mode: str, layers: int) -> float:
    """Share of the stage's layers whose forward runs twice."""
    return {"none": 0.0, "full": 1.0, "full_keep_attn": 1.0, "selective": math.ceil(layers / 2) / layers}[
        mode
    ]


def step_time(
    shape: ModelShape, layout: Layout, work: Workload, rates: DeviceRates, gpus_per_node: int = 8
) -> StepTime:
    rv = rank_view(shape, layout, work)
    b, d, h, ls = work.compute_bytes, shape.head_dim, shape.hidden, rv.stage_layers
    m, tm = rv.microbatches, rv.mb_tokens
    speed = 1.0 if b == 2 else rates.fp32_speed
    mm_rate = rates.matmul_tflops * 1e12 * speed
    attn_rate = rates.attention_rate(d) * 1e12 * speed
    intra = {k: span <= gpus_per_node for k, span in group_spans(layout).items()}
    ac = ac_fraction(work.activation_checkpointing, ls)

    # LoRA: frozen base matmuls run forward + input gradient only (4 T P), the adapters all three passes.
    base_weight_grad = not work.lora_rank
    base_passes = 6 if base_weight_grad else 4
    fp8 = work.fp8 and b == 2  # training.fp8: the projections at the FP8 rate, the LM head stays bf16
    fp8_share = work.fp8_share(shape.layers) if fp8 else 0.0
    fp8_rate = rates.fp8_rate(work.fp8_recipe) * 1e12
    # rowwise_with_gw_hp: the weight gradient's GEMM (2 of the 6 T P) stays bf16, with no FP8 copies.
    weight_grad_fp8 = base_weight_grad and work.fp8_recipe != "rowwise_with_gw_hp"
    hp_passes = 2 if fp8 and base_weight_grad and not weight_grad_fp8 else 0
    fp8_passes = (base_passes - hp_passes) / fp8_rate + hp_passes / mm_rate
    # seconds per token and projection parameter: all passes, and the forward alone (the recompute's)
    per_param = fp8_share * fp8_passes + (1 - fp8_share) * base_passes / mm_rate
    per_param_fwd = fp8_share * 2 / fp8_rate + (1 - fp8_share) * 2 / mm_rate
    p_adapter = adapter_layer_params(shape, work.lora_rank, work.lora_targets, layout.tp)
    p_mm = shape.layer_matmul_params(layout.tp)
    mm_layers = rv.tokens * ls * (per_param * p_mm + 6 * p_adapter / mm_rate)
    mm_fwd_layers = rv.tokens * ls * (per_param_fwd * p_mm + 2 * p_adapter / mm_rate)
    mm_head = base_passes * rv.tokens * shape.vocab * h / mm_rate
    mm_fwd_head = 2 * rv.tokens * shape.vocab * h / mm_rate
    imbalance = (2 * layout.ring - 1) / layout.ring if layout.cp_layout == "contiguous" else 1.0
    attn_flops = 7 * rv.mb_seqs * m * work.seq_len**2 * rv.heads * d * ls / layout.cp
    # Small kernel calls run below the calibrated rate (tile ramp-up, launch): efficiency n / (n + 512)
    # for blocks of n query tokens - an assumption. A ring step attends a block of about Tm/2 queries to
    # Tm/2 keys; Ulysses (and no CP) runs one call over the whole sequence of its group.
    block = tm / 2 if layout.ring > 1 else tm * layout.ulysses
    balanced = attn_flops / (attn_rate * block / (block + SMALL_BLOCK_TOKENS))
    attention = balanced * imbalance
    chunked = work.seq_len // layout.cp > max(1, work.loss_chunk // rv.mb_seqs)
    attn_recompute = 0.0 if work.activation_checkpointing == "full_keep_attn" else attention / 3.5
    recompute = ac * (mm_fwd_layers + attn_recompute) + (mm_fwd_head if chunked else 0.0)
    g = min(work.ac_group, ls) if work.activation_checkpointing == "full" else 1
    if g > 1:  # rebuilding a group's layer inputs: one more forward of g - 1 of its g layers
        recompute += (g - 1) / g * (mm_fwd_layers + attention / 3.5)

    # Per layer and microbatch; attention time per ring step is what a KV transfer can hide behind. Only
    # the balanced share counts: a transfer (and an FSDP collective) waits for the least busy rank too.
    cp_fwd = cp_bwd = 0.0
    if layout.ring > 1:
        bw = rates.bandwidth("p2p", intra["ring"])
        kv, dkv = 2 * b * tm * rv.kv_heads * d / bw, 8 * tm * rv.kv_heads * d / bw
        fwd_step = balanced / (ls * m) / 3.5 / layout.ring
        bwd_step = fwd_step * 2.5
        r = layout.ring
        cp_fwd += (r - 1) * max(0.0, kv - fwd_step)
        # Backward: the next KV block and the previous step's dK/dV share the link under this step's
        # compute; only the last dK/dV hop (home) has nothing to hide behind.
        cp_bwd += (r - 1) * max(0.0, kv + dkv - bwd_step) + dkv
    if layout.ulysses > 1:
        u = layout.ulysses
        vol = ulysses_exchange_bytes(tm, rv.heads, rv.kv_heads, d, u, b)
        a2a = vol / rates.bandwidth("alltoall", intra["ulysses"])
        cp_fwd += a2a
        cp_bwd += a2a
    cp_comm = ls * m * (cp_fwd * (1 + ac) + cp_bwd)

    tp_comm = 0.0
    if layout.tp > 1:
        t = layout.tp
        one = 2 * (t - 1) / t * b * tm * h / rates.bandwidth("collective", intra["tp"])
        tp_comm = ls * m * one * (2 * (1 + ac) + 2)

    fsdp = 0.0
    f = layout.dp * layout.cp
    if f > 1:
        bw = rates.bandwidth("collective", intra["fsdp"])
        share = (f - 1) / f
        p_layer, p_root = shape.layer_params(layout.tp), shape.root_params(layout.pp)
        # Resharding after forward gathers each layer again in backward - per microbatch under PP.
        regather = 2 * m if work.reshard_after_forward else 1
        # FP8 all-gather: the projection weights travel as 1 byte each (norms and root stay at b).
        gb = (1 * p_mm + b * 2 * h) / p_layer if work.fp8_all_gather and fp8 else b
        gathers = ls * regather * p_layer * gb + p_root * b
        reduced = ls * p_adapter if work.lora_rank else ls * p_layer + p_root  # fp32 reduce-scatter
        total = share * (gathers + 4 * reduced) / bw
        first = share * gb * p_layer / bw
        fsdp = first + max(0.0, total - (mm_layers + mm_head + balanced + recompute))

    # Memory-bound elementwise work per token and layer (forward): two RMSNorms with their fp32 upcast
    # (~60h bytes with the residual adds), SiLU x up over the MLP width (~12 I/t), RoPE on q and k
    # (~16 (a_r + k_r) d); backward moves about twice that, a recompute once more. The chunked loss streams
    # fp32 logits about ten times (40 V bytes per token); AdamW reads p, g, m, v and writes p, m, v. The
    # rate is the calibrated effective one (calibration.py), not the HBM's peak.
    hbm = rates.elementwise_gbps * 1e9
    per_token = 60 * h + 12 * shape.intermediate / layout.tp + 16 * (rv.heads + rv.kv_heads) * d
    weight_casts = 0.0
    if fp8:
        cast = fp8_cast_bytes(h, rv.heads, rv.kv_heads, d, shape.intermediate / layout.tp, weight_grad_fp8)
        per_token += fp8_share * cast / 3
        weight_casts = m * fp8_weight_cast_bytes(work, layout, p_mm, ls * fp8_share, ac)
    trained = (
        ls * p_adapter
        if work.lora_rank
        else ls * shape.layer_params(layout.tp) + shape.root_params(layout.pp)
    )
    shard = trained / (layout.dp * layout.cp)  # what AdamW steps
    fused = COMPILED_ELEMENTWISE if work.compiled else 1.0  # the optimizer step is not compiled
    memory_bound = (
        rv.tokens * (ls * per_token * (3 + ac) + 40 * shape.vocab) * fused
        + weight_casts
        + 28 * shard / rv.steps
    ) / hbm

    busy = mm_layers + mm_head + attention + recompute + memory_bound + cp_comm + tp_comm + fsdp
    bubble = busy * (layout.pp - 1) / m
    ga = rv.steps
    return StepTime(
        matmul=ga * (mm_layers + mm_head),
        attention=ga * attention,
        recompute=ga * recompute,
        memory_bound=ga * memory_bound,
        cp_comm=ga * cp_comm,
        tp_comm=ga * tp_comm,
        fsdp_comm=ga * fsdp,
        pp_bubble=ga * bubble,
        tokens_per_step=work.micro_batch_size * work.seq_len * work.grad_accum * layout.dp,
        world_size=layout.world_size,
    )
