"""Predicted peak memory per GPU for one layout, in bytes - the formulas of docs/parallelism.md.

Notation: L layers, h hidden, a heads, g kv heads, d head_dim, I intermediate, V vocab, b bytes of the
compute dtype (2 for bfloat16, 4 for float32); degrees dp, tp=t, pp=p, cp=c=U*R (U ulysses, R ring),
F = dp*c the FSDP shard degree. Per rank: a_r = a/t query heads, k_r kv heads (g/t, replicated up to U
under Ulysses when g/t < U), Ls = ceil(L/p) layers, Tm = local tokens of one microbatch: micro_batch*seq_len/c without PP; with PP
the step's grad_accum*micro_batch sequences form m = pp_microbatches microbatches (default one sequence).

    params + grads + AdamW   16 * ceil(P_stage / F)        fp32 master, fp32 grads, 2 fp32 moments
                             (LoRA: b * ceil(P_stage / F) frozen base + 16 * ceil(P_adapter / F); no
                             unsharded base or head gradient in `gathered` - parallel/planner/lora.py;
                             training.fp8 with the frozen-weight cache and F = t = 1: + 2 * P_mm)
    gathered (FSDP)          b * P_root  + b * V*h  + (3b + 4) * P_layer
                             root (embeddings, norm, head) stays gathered, the head's unsharded grad
                             lives until the root reduce-scatter, and per layer: the one computing, the
                             one prefetched, one layer's unsharded grad with its fp32 reduce copy
                             (reshard_after_forward=false keeps all Ls layers gathered instead)
    activations / layer / token, flash-style attention (no S^2 term):
        A = 2*(b*h + 4)                         two RMSNorms (models/norm.py): normed output + fp32 1/rms
                                                (HF's norms, kept under TP sequence parallel: 2*(4 + b)*h
                                                with their fp32 upcast; replicated over tp unless SP)
          + b*(a_r + 2*k_r)*d                   q, k, v after RoPE (after the Ulysses exchange)
          + n_o*b*a_r*d + 4*a_r                 attention output: n_o = 1 for the pure ring (written where
                                                o_proj reads it), 2 otherwise (kernel copy + o_proj input);
                                                fp32 LSE
          + 4*b*ceil(I/t)                       gate, up, SiLU(gate), SiLU(gate)*up (compiled: 3*b*ceil(I/t),
                                                the fused SiLU x up keeps no SiLU output)
    activations              none: Ls*A*Tf;  full: Ls*b*h*Tf (ac_group g: ceil(Ls/g)*b*h*Tf, + (g-1)*b*h*Tm
                             rebuilt in backward); selective: half the layers each; activation_offload:
                             the saved part is on the host (0 here); mlp_chunks c: the MLP term / c
                             (+ A*Tm for the layer being recomputed / back-propagated, + the final
                             norm's A/2*Tm); Tf = tokens in flight = Tm * (m for GPipe, min(p, m) else)
    attention buffers        Tm * [4*a_r*d + 4*a_r + 8*k_r*d]      fp32 out/dQ, LSE, dK/dV (cp_accum=input:
                                                                   b instead of 4 bytes for out/dQ/dK/dV)
                             + Tm * b*[a_r*d + 2*k_r*d + 2*h]      dO, one call's dk/dv, the residual
                                                                   stream's gradients
                             + Rc * a_r/U * [3*b*d + 4*d + 4]      one backward kernel call: its copies of
                                                                   the O/dO rows, its dq, the kernel's fp32
                                                                   dQ workspace and row statistics; Rc =
                                                                   min(U*Tm/seqs, BACKWARD_ROWS)*seqs rows
                             ring R>1: + Tm * [4*b*k_r*d + 8*k_r*d]  2 KV blocks + 1 dKV block in flight
                             Ulysses U>1: + Tm * 2*b*(a_r + 2*k_r)*d  all-to-all send/receive copies
    LM-head logits           chunk * V * (b + 12): one loss_chunk of logits plus 3 fp32 tensors (12 if unchunked;
                             compiled: one fp32 tensor, b + 4)
    MLP backward             3*b*ceil(I/t)/mlp_chunks * Tm: gradients of SiLU(gate)*up, up and gate (compiled: 2*b)
    peak = params + AdamW + max(layer phase, loss phase) + overhead, where the layer phase holds the
           gathered layers, one layer's working set, the larger of its MLP backward gradients and its
           attention buffers beyond the freed MLP part, and
           max(saved activations, grads) - a step starts without gradients and backward builds them as it
           frees the saved activations (with gradient accumulation or PP the grads stay: both, summed)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from parallel.cp.ring import BACKWARD_ROWS
from parallel.dims import fp8_all_gather, holds_whole_weights
from parallel.planner.enumerate import Layout
from parallel.planner.lora import adapter_activation_bytes, adapter_layer_params, lora_settings
from parallel.shape import ModelShape

GIB = 1024**3


@dataclass(frozen=True)
class Workload:
    """The non-layout settings that shape memory and time (from the run config)."""

    seq_len: int
    micro_batch_size: int = 1
    grad_accum: int = 1
    compute_bytes: int = 2
    activation_checkpointing: str = "none"
    sequence_parallel: bool = False
    loss_chunk: int = 4096
    pp_microbatches: int | None = None
    pp_schedule: str = "1F1B"
    reshard_after_forward: bool = True
    fsdp_cpu_offload: bool = False
    ac_group: int = 1
    activation_offload: bool = False
    mlp_chunks: int = 1
    cp_accum: str = "float32"
    compiled: bool = False
    """parallel.compile: torch.compile fuses each layer's elementwise work and the loss chunk."""
    lora_rank: int = 0
    """lora.r: > 0 trains adapters on a frozen base (parallel/planner/lora.py)."""
    lora_targets: tuple[str, ...] = ()
    fp8: bool = False
    """training.fp8: the decoder projections' matmuls at the FP8 rate, plus their cast traffic (cost.py)."""
    fp8_recipe: str = "tensorwise"
    fp8_bf16_layers: int = 0
    """training.fp8_bf16_layers: the model's first and last this many layers keep bf16 projections."""
    fp8_all_gather: bool = False
    """FSDP2 all-gathers the FP8-cast projection weights (1 byte per parameter)."""
    fp8_cache_frozen: bool = False
    """training.fp8_cache_frozen under LoRA: a rank holding whole weights keeps two FP8 copies of each frozen
    projection (2 bytes per parameter)."""

    def fp8_cache_on(self, layout: Layout) -> bool:
        """training.fp8_cache_frozen takes effect on `layout`: its ranks hold whole weights (the rule of
        models/parallelize.fp8_cache_frozen); elsewhere the base is cast in every matmul."""
        shards = layout.dp * layout.cp
        return self.fp8_cache_frozen and holds_whole_weights(layout.tp, shards, self.fsdp_cpu_offload)

    def fp8_share(self, layers: int) -> float:
        """The share of a model of `layers` layers whose projections run in FP8 (none without fp8)."""
        return max(0, layers - 2 * self.fp8_bf16_layers) / layers if self.fp8 else 0.0

    @classmethod
    def from_config(cls, cfg: Any) -> Workload:
        """From a trainer Config (read by attribute: parallel/ does not import trainer/)."""
        t, p = cfg.training, cfg.parallel
        rank, targets = lora_settings(cfg)
        return cls(
            seq_len=t.seq_len,
            micro_batch_size=t.micro_batch_size,
            grad_accum=t.grad_accum,
            compute_bytes=2 if cfg.model.dtype == "bfloat16" else 4,
            activation_checkpointing=p.activation_checkpointing,
            sequence_parallel=p.sequence_parallel,
            loss_chunk=t.loss_chunk,
            pp_microbatches=p.pp_microbatches,
            pp_schedule=p.pp_schedule,
            reshard_after_forward=p.reshard_after_forward,
            fsdp_cpu_offload=p.fsdp_cpu_offload,
            ac_group=p.ac_group,
            activation_offload=p.activation_offload,
            mlp_chunks=p.mlp_chunks,
            cp_accum=p.cp_accum,
            compiled=p.compile,
            lora_rank=rank,
            lora_targets=targets,
            fp8=t.fp8,
            fp8_recipe=t.fp8_recipe,
            fp8_bf16_layers=t.fp8_bf16_layers,
            fp8_all_gather=fp8_all_gather(cfg),
            fp8_cache_frozen=t.fp8 and t.fp8_cache_frozen and rank > 0,
        )


@dataclass(frozen=True)
class RankView:
    """Per-rank quantities of a layout that both the memory and the time model use.

    Without PP an optimizer step is grad_accum micro-steps of micro_batch_size sequences. With PP it is
    one pipeline pass over all grad_accum * micro_batch_size sequences, cut into pp_microbatches
    (default: one sequence each), as trainer/trainer.py runs it.
    """

    stage_layers: int
    heads: int
    kv_heads: int
    steps: int
    """Forward/backward passes per optimizer step (grad_accum without PP, 1 with it)."""
    microbatches: int
    """Pipeline microbatches per pass (1 without PP)."""
    mb_seqs: int
    """Sequences per microbatch."""
    mb_tokens: int
    """Local tokens per microbatch (Tm)."""
    in_flight: int
    """Microbatches whose activations a stage holds at once."""

    @property
    def tokens(self) -> int:
        """Local tokens per pass (T)."""
        return self.mb_tokens * self.microbatches


def rank_view(shape: ModelShape, layout: Layout, work: Workload) -> RankView:
    kv = shape.kv_heads // layout.tp
    u = layout.ulysses
    if layout.pp == 1:
        steps, m, seqs = work.grad_accum, 1, work.micro_batch_size
    else:
        per_step = work.grad_accum * work.micro_batch_size
        steps, m = 1, work.pp_microbatches or per_step
        seqs = max(1, per_step // m)
    return RankView(
        stage_layers=math.ceil(shape.layers / layout.pp),
        heads=shape.heads // layout.tp,
        kv_heads=max(kv, u) if u > 1 else kv,
        steps=steps,
        microbatches=m,
        mb_seqs=seqs,
        mb_tokens=seqs * work.seq_len // layout.cp,
        in_flight=m if work.pp_schedule == "GPipe" else min(layout.pp, m),
    )


def norm_bytes(shape: ModelShape, layout: Layout, work: Workload) -> int:
    """What one RMSNorm keeps per token: models/norm.py's normed output and fp32 1/rms, or - under TP
    sequence parallel, where HF's norm stays - its fp32 upcast of the input as well."""
    b, h = work.compute_bytes, shape.hidden
    return (4 + b) * h if layout.tp > 1 and work.sequence_parallel else b * h + 4


def layer_activation_bytes(shape: ModelShape, layout: Layout, work: Workload, tokens: int) -> int:
    """Saved activations of one decoder layer for `tokens` local tokens, no checkpointing."""
    b, d, rv = work.compute_bytes, shape.head_dim, rank_view(shape, layout, work)
    rep_tokens = tokens // layout.tp if work.sequence_parallel else tokens
    replicated = 2 * norm_bytes(shape, layout, work) * rep_tokens
    out_copies = 1 if layout.ring > 1 and layout.ulysses == 1 else 2
    per_token = (
        b * (rv.heads + 2 * rv.kv_heads) * d
        + out_copies * b * rv.heads * d
        + 4 * rv.heads
        + mlp_bytes(shape, layout, work, mlp_tensors(work))
        + adapter_activation_bytes(work.lora_rank, work.lora_targets, b)
    )
    return replicated + per_token * tokens


def mlp_tensors(work: Workload) -> int:
    """[tokens, intermediate] tensors an MLP saves: gate, SiLU(gate), up and their product - compiled, the
    fused SiLU x up keeps no SiLU output."""
    return 3 if work.compiled else 4


def mlp_bytes(shape: ModelShape, layout: Layout, work: Workload, tensors: int) -> int:
    """Bytes per token of `tensors` [tokens, intermediate / tp] tensors of one MLP tile (mlp_chunks)."""
    return tensors * work.compute_bytes * math.ceil(shape.intermediate / layout.tp) // work.mlp_chunks


def saved_activation_bytes(shape: ModelShape, layout: Layout, work: Workload) -> int:
    """Activations that outlive their layer (checkpoints, kept attention outputs, un-checkpointed layers)."""
    rv = rank_view(shape, layout, work)
    return (
        activation_bytes(shape, layout, work)
        - layer_activation_bytes(shape, layout, work, rv.mb_tokens)
        - norm_bytes(shape, layout, work) * rv.mb_tokens
    )


def activation_bytes(shape: ModelShape, layout: Layout, work: Workload) -> int:
    rv = rank_view(shape, layout, work)
    tm, tf, ls = rv.mb_tokens, rv.mb_tokens * rv.in_flight, rv.stage_layers
    b, h = work.compute_bytes, shape.hidden
    full = layer_activation_bytes(shape, layout, work, tf)
    inputs = b * h * (tf // layout.tp if work.sequence_parallel else tf)
    mode = work.activation_checkpointing
    ckpt = {"none": 0, "full": ls, "full_keep_attn": ls, "selective": math.ceil(ls / 2)}[mode]
    g = min(work.ac_group, ls) if mode == "full" else 1
    # Two-level checkpointing keeps one input per group; backward rebuilds the g - 1 others of a group.
    saved = (ls - ckpt) * full + (math.ceil(ls / g) if g > 1 else ckpt) * inputs
    reloaded = 0
    if work.activation_offload:  # every saved tensor of the layers waits in host memory instead ...
        saved = 0
        reloaded = inputs // rv.in_flight  # ... but the one being back-propagated comes back
    if mode == "full_keep_attn":  # the kept attention output (compute dtype) and fp32 LSE of every layer
        saved += ls * tf * rv.heads * (b * shape.head_dim + 4)
    working = layer_activation_bytes(shape, layout, work, tm) + (g - 1) * b * h * tm + reloaded
    return saved + working + norm_bytes(shape, layout, work) * tm


def attention_buffer_bytes(shape: ModelShape, layout: Layout, work: Workload) -> int:
    rv = rank_view(shape, layout, work)
    b, d, a, k = work.compute_bytes, shape.head_dim, rv.heads, rv.kv_heads
    f = 4 if work.cp_accum == "float32" else b  # bytes per element of the ring's accumulators
    per_token = f * a * d + 4 * a + 2 * f * k * d
    # Backward's own tensors while the attention back-propagates: dO, one kernel call's dk/dv (over up to
    # all local keys) and the residual stream's two gradients (the incoming one and the layer input's).
    per_token += b * a * d + 2 * b * k * d + 2 * b * shape.hidden
    if layout.ring > 1:
        per_token += 4 * b * k * d + 2 * f * k * d
    if layout.ulysses > 1:
        per_token += 2 * b * (a + 2 * k) * d
    # One backward kernel call at a time, on at most BACKWARD_ROWS query rows (of the whole sequence and
    # a/U heads after a Ulysses exchange): O/dO row copies, dq, and the kernel's fp32 dQ workspace + stats.
    # A call covers one block for every sequence of the microbatch (they share the plan).
    u = layout.ulysses
    rows = min(u * rv.mb_tokens // rv.mb_seqs, BACKWARD_ROWS) * rv.mb_seqs
    per_call = rows * (a // u) * (3 * b * d + 4 * d + 4)
    return per_token * rv.mb_tokens + per_call


def logits_bytes(shape: ModelShape, layout: Layout, work: Workload) -> int:
    rv = rank_view(shape, layout, work)
    seqs = rv.mb_seqs
    per_row = min(max(1, work.loss_chunk // seqs), work.seq_len // layout.cp)
    # Backward of a chunk: the fp32 log-softmax, the fp32 gradient the cross-entropy hands back and the one it
    # passes on (12 bytes), plus - measured, when the chunk is a checkpoint recomputed in backward - the logits
    # in the compute dtype. One chunk for the whole local sequence runs without checkpoint: 12 bytes (1B, 64k
    # tokens in one chunk on 2x H100: 52.2 GiB measured, 52.2 predicted; b + 12 said 60.1).
    # Compiled, the fused log-softmax and pick keep row statistics only: the backward holds one fp32 gradient.
    checkpointed = work.seq_len // layout.cp > per_row
    fp32_tensors = 1 if work.compiled else 3
    return seqs * per_row * shape.vocab * (4 * fp32_tensors + (work.compute_bytes if checkpointed else 0))


@dataclass(frozen=True)
class MemoryBreakdown:
    params: int
    grads: int
    optimizer: int
    gathered: int
    activations: int
    attention: int
    logits: int
    overhead: int
    saved_activations: int = 0
    """The part of `activations` that outlives a layer (what the loss phase still holds)."""
    gathered_root: int = 0
    """The part of `gathered` that stays during the loss: root parameters and the head's gradient."""
    mlp_working: int = 0
    """The working layer's MLP activations, already freed when its attention runs backward."""
    mlp_grads: int = 0
    """Gradients the MLP's backward makes beside its saved intermediates (the product's, up's and gate's)."""
    grads_resident: bool = True
    """Gradients live through the whole step (gradient accumulation, PP). Otherwise the step starts without
    them (the trainer sets them to None after each update) and backward makes them layer by layer."""

    @property
    def allocated(self) -> int:
        """Peak of the allocator (what torch.cuda.max_memory_allocated reports): the static state plus the
        larger of two phases - inside a decoder layer (its working set, gathered layers, and the attention
        buffers where they exceed the MLP activations that backward has freed by the time attention runs)
        and in the chunked loss (saved activations, root parameters, one chunk of logits). Gradients that
        backward creates replace the saved activations it frees: at the first layer back all inputs are
        still saved and no gradient exists, at the last the reverse, so the layer phase holds the larger."""
        working = self.activations - self.saved_activations
        # Backward of one layer: first its MLP (intermediates + their gradients), then its attention
        # (buffers, once the MLP's intermediates are freed) - whichever needs more on top of the working set.
        backward = max(self.mlp_grads, self.attention - self.mlp_working)
        static = self.params + self.optimizer
        if self.grads_resident:
            static += self.grads
            held = self.saved_activations
        else:
            held = max(self.saved_activations, self.grads)
        layer_phase = self.gathered + working + held + backward
        loss_phase = self.gathered_root + self.saved_activations + self.logits
        return static + max(layer_phase, loss_phase)

    @property
    def total(self) -> int:
        return self.allocated + self.overhead

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def memory_breakdown(
    shape: ModelShape, layout: Layout, work: Workload, overhead_bytes: int = 0
) -> MemoryBreakdown:
    """Predicted peak bytes on the busiest GPU of `layout` (see the module docstring for each term)."""
    b = work.compute_bytes
    rv = rank_view(shape, layout, work)
    p_layer = shape.layer_params(layout.tp)
    p_root = shape.root_params(layout.pp)
    shard = math.ceil((rv.stage_layers * p_layer + p_root) / (layout.dp * layout.cp))
    on_gpu = 0 if work.fsdp_cpu_offload else shard
    kept = rv.stage_layers if not work.reshard_after_forward else 2
    gathered_root = b * p_root + b * shape.vocab * shape.hidden
    gathered = gathered_root + b * kept * p_layer + (b + 4) * p_layer
    params, trained = 4 * on_gpu, on_gpu
    if work.lora_rank:  # frozen base in the compute dtype; only the adapters have grads and AdamW state
        p_adapter = adapter_layer_params(shape, work.lora_rank, work.lora_targets, layout.tp)
        trained = (
            0 if work.fsdp_cpu_offload else math.ceil(rv.stage_layers * p_adapter / (layout.dp * layout.cp))
        )
        params = b * on_gpu + 4 * trained
        if work.fp8_cache_on(layout):
            cached = rv.stage_layers * work.fp8_share(shape.layers) * shape.layer_matmul_params()
            params += math.ceil(2 * cached)  # models/fp8_frozen.py: two FP8 copies
        gathered_root = b * p_root  # no unsharded LM-head gradient
        gathered = gathered_root + b * kept * p_layer + (b + 4) * p_adapter
    return MemoryBreakdown(
        params=params,
        grads=4 * trained,
        optimizer=8 * trained,
        gathered=gathered,
        activations=activation_bytes(shape, layout, work),
        attention=attention_buffer_bytes(shape, layout, work),
        logits=logits_bytes(shape, layout, work),
        overhead=overhead_bytes,
        saved_activations=saved_activation_bytes(shape, layout, work),
        gathered_root=gathered_root,
        mlp_working=mlp_bytes(shape, layout, work, mlp_tensors(work)) * rv.mb_tokens,
        mlp_grads=mlp_bytes(shape, layout, work, mlp_tensors(work) - 1) * rv.mb_tokens,
        grads_resident=work.grad_accum > 1 or layout.pp > 1,
    )
