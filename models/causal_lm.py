"""The training view of a Llama-family causal LM: one module per pipeline stage (the whole model at pp=1).

A `CausalLMStage` holds a contiguous slice of a Hugging Face `*ForCausalLM` - the embedding on the first
stage, decoder layers [first, last), the final norm and LM head on the last stage - under the *same
parameter names* as the HF model (`model.layers.3.mlp.up_proj.weight`, `lm_head.weight`), so checkpoints
and the HF export need no key mapping. Its forward is explicit (no S x S mask is ever built) and ends in
the chunked loss, so FSDP can treat the stage as its root module. Single-device code: parallelism is
attached from outside (`cp_attention` spec, `ac_layers`, TP/FSDP wrappers).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.families import rope_needs_length, stage_scales
from models.fused_loss import IMPLS, fused_cross_entropy_sum, liger_cross_entropy_sum
from models.loss import chunked_cross_entropy_sum, chunked_token_scores
from models.offload import HostOffload
from parallel.cp.spec import CPSpec


class CausalLMStage(nn.Module):
    def __init__(
        self,
        hf_model: nn.Module,
        first_layer: int = 0,
        last_layer: int | None = None,
        loss_chunk: int = 4096,
        loss_impl: str = "chunked",
    ):
        super().__init__()
        inner = hf_model.model
        n_layers = len(inner.layers)
        last_layer = n_layers if last_layer is None else last_layer
        self.config = hf_model.config
        self.is_first = first_layer == 0
        self.is_last = last_layer == n_layers
        self.loss_chunk = loss_chunk
        if loss_impl not in IMPLS:
            raise ValueError(f"training.loss_impl: must be one of {' | '.join(IMPLS)}, got {loss_impl!r}")
        self.loss_impl = loss_impl  # training.loss_impl: chunked | fused | liger (models/fused_loss.py)
        self.compile_loss = False  # parallel.compile: the chunked loss through torch.compile too
        self.model = nn.Module()  # mirrors HF naming: model.embed_tokens / model.layers.<i> / model.norm
        self.model.embed_tokens = inner.embed_tokens if self.is_first else None
        self.model.layers = nn.ModuleDict({str(i): inner.layers[i] for i in range(first_layer, last_layer)})
        self.model.norm = inner.norm if self.is_last else None
        self.model.rotary_emb = inner.rotary_emb
        self.lm_head = hf_model.lm_head if self.is_last else None
        self.cp: CPSpec | None = None
        self.doc_mask = True  # False: doc_ids (if passed) are ignored and attention is plain causal
        self.ac_layers: set[str] = set()
        self.ac_group = 1  # >1: checkpoint runs of this many layers around the per-layer checkpoints
        self.offload_activations = False
        self.keep_attention = False  # with checkpointed layers: reuse attention outputs in the recompute
        self.sequence_shards = None  # (to_shard, to_full) with TP sequence parallel (parallel/tp.py)
        self.loss_scale = 1.0  # set per step by the trainer: (fsdp world size) / (global valid tokens)
        # Granite scales the embeddings and divides the logits in its model's forward, outside any module.
        self.embed_scale, self.logits_divisor = stage_scales(self.config)
        self.rope_needs_length = rope_needs_length(self.config)

    @staticmethod
    def _layer(layer: nn.Module, h: torch.Tensor, **kwargs) -> torch.Tensor:
        out = layer(h, attention_mask=None, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _run_layers(self, layers: list[tuple[str, nn.Module]], h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        for name, layer in layers:
            if name in self.ac_layers and torch.is_grad_enabled():
                h = checkpoint(self._layer, layer, h, use_reentrant=False, **kwargs)
            else:
                h = self._layer(layer, h, **kwargs)
        return h

    def _rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at this rank's global (e.g. zigzag-permuted) positions: exact for every static RoPE type.
        Dynamic NTK and LongRoPE choose their frequencies from the largest position they are shown, so they
        are shown the unsharded batch's (one extra column, dropped again) instead of this shard's."""
        if not self.rope_needs_length:
            return self.model.rotary_emb(h, position_ids)
        top = position_ids.max()
        if self.cp is not None and self.cp.max_position is not None:
            top = self.cp.max_position(top)
        extra = top.reshape(1, 1).to(position_ids.dtype).expand(position_ids.shape[0], 1)
        cos, sin = self.model.rotary_emb(h, torch.cat([position_ids, extra], dim=1))
        return cos[:, :-1], sin[:, :-1]

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        per_token: bool = False,
    ):
        """x: input ids [B, S_local] (first stage) or hidden states. Returns, on the last stage, the scaled
        sum of token losses (shape [1]) when labels are given, else the final hidden states; on other
        (pipeline) stages the tuple (hidden, position_ids, doc_ids, labels) that the next stage takes.
        `per_token` (evaluation, with labels): the unscaled per-token losses and arg-max ids instead."""
        h = self.model.embed_tokens(x) if self.is_first else x
        if self.is_first and self.embed_scale != 1.0:
            h = h * self.embed_scale
        docs = doc_ids if self.doc_mask else None
        ctx = None
        if self.cp is not None:
            # positions, not h: between pipeline stages h may be split over TP (sequence parallel)
            ctx = self.cp.make_context(position_ids.shape[1] * self.cp.seq_shards, docs)
        elif docs is not None:
            from parallel.cp.api import build_context  # single device: documents still must not mix

            ctx = build_context(position_ids.shape[1], layout="contiguous", doc_ids=docs)
        if ctx is not None and self.keep_attention and torch.is_grad_enabled():
            ctx.keep = {}
        rope = self._rotary(h, position_ids)
        if self.sequence_shards is not None and self.is_first:
            h = self.sequence_shards[0](h)  # the residual stream is split over TP between layers
        # Activation offload: tensors saved for backward (with full AC: only the layer inputs; with
        # ac_group: only the group inputs) wait in pinned host memory instead of on the GPU.
        offload = HostOffload() if self.offload_activations else contextlib.nullcontext()
        kwargs = dict(position_ids=position_ids, position_embeddings=rope, cp_context=ctx)
        layers = list(self.model.layers.items())
        with offload:
            if self.ac_group > 1 and torch.is_grad_enabled():
                # Two-level checkpointing: the forward keeps one input per group; backward rebuilds a
                # group's layer inputs (an extra forward of its first g-1 layers: torch's recompute stops
                # once the last input exists) and then each layer's internals as usual. Held at once:
                # n/g group inputs + g layer inputs instead of n layer inputs.
                for i in range(0, len(layers), self.ac_group):
                    group = layers[i : i + self.ac_group]
                    h = checkpoint(self._run_layers, group, h, kwargs, use_reentrant=False)
            else:
                h = self._run_layers(layers, h, kwargs)
        if not self.is_last:
            return h, position_ids, doc_ids, labels
        if self.sequence_shards is not None:
            h = self.sequence_shards[1](h)
        h = self.model.norm(h)
        if labels is None:
            return h
        if self.logits_divisor != 1.0:
            h = h / self.logits_divisor  # = logits / logits_scaling: the LM head is linear without bias
        if per_token:
            return chunked_token_scores(h, self.lm_head, labels, self.loss_chunk)
        # Shape [1], not a scalar: the pipeline schedule concatenates stage outputs across micro-batches.
        # A new tensor, not a reshape view: FSDP2 warns about (and cannot hook in-place ops on) view outputs.
        return torch.stack([self._loss_sum(h, labels) * self.loss_scale])

    def _loss_sum(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss_impl == "fused":
            return fused_cross_entropy_sum(h, self.lm_head, labels, self.loss_chunk, self.compile_loss)
        if self.loss_impl == "liger" and torch.is_grad_enabled():
            return liger_cross_entropy_sum(h, self.lm_head, labels)
        return chunked_cross_entropy_sum(h, self.lm_head, labels, self.loss_chunk, self.compile_loss)


class TiledMLP(nn.Module):
    """A Llama-family MLP run over `chunks` slices of the sequence, each recomputed in backward, so the
    [S, intermediate] activations exist for one slice at a time (the MLP is per token: same result).

    It adopts the original MLP's submodules under the same names (`mlp.gate_proj.weight` stays
    `mlp.gate_proj.weight`), so checkpoints and the HF export are unaffected, and runs the original
    class's forward on each slice."""

    def __init__(self, mlp: nn.Module, chunks: int):
        super().__init__()
        self._forward_one = type(mlp).forward
        for name, child in mlp.named_children():
            self.add_module(name, child)
        for name, value in vars(mlp).items():
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)  # plain attributes the original forward reads (e.g. config)
        self.chunks = chunks

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_one(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunks <= 1 or x.shape[1] < self.chunks:
            return self._one(x)
        grad = torch.is_grad_enabled()
        parts = [
            checkpoint(self._one, p, use_reentrant=False) if grad else self._one(p)
            for p in x.chunk(self.chunks, 1)
        ]
        return torch.cat(parts, dim=1)


def tile_mlps(stage: CausalLMStage, chunks: int) -> None:
    """Replace every decoder layer's MLP by a `TiledMLP` (before FSDP wraps the layers)."""
    if chunks > 1:
        for layer in stage.model.layers.values():
            layer.mlp = TiledMLP(layer.mlp, chunks)


def split_layers(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges per pipeline stage, as even as possible (earlier stages get the extra layer:
    the last stage also runs the LM head and loss)."""
    if not 1 <= stages <= n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {stages} pipeline stages")
    base, extra = divmod(n_layers, stages)
    bounds, start = [], 0
    for s in range(stages):
        end = start + base + (1 if s < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds
