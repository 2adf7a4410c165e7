"""Export a (sharded) model to a Hugging Face directory: safetensors + config + tokenizer."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from trainer.checkpoint import _agreed, _all_gather, _barrier, _rank

logger = logging.getLogger(__name__)


def export_hf(
    model_parts: list[nn.Module],
    hf_model_config: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype = "bfloat16",
    state_dicts: list[Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Collective. Write a `from_pretrained`-loadable directory (safetensors + config + tokenizer).

    Tensors are gathered one at a time (DTensor.full_tensor), so no rank holds more than its own parts in
    full. The lowest rank holding a key writes it: rank 0 for a plain or FSDP/TP model, the first rank
    of each pipeline stage under PP, each into its own safetensors shard plus an index. `state_dicts`
    (one per part, HF names) replaces the parts' own state dicts, e.g. LoRA weights merged into the base.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    rank = _rank()
    sds = state_dicts if state_dicts is not None else [get_model_state_dict(p) for p in model_parts]
    owners: dict[str, int] = {}
    for r, keys in enumerate(_all_gather(sorted({k for sd in sds for k in sd}))):
        for k in keys:
            owners.setdefault(k, r)
    tied = bool(getattr(hf_model_config, "tie_word_embeddings", False))
    mine: dict[str, torch.Tensor] = {}
    for sd in sds:
        for key, value in sd.items():
            if hasattr(value, "full_tensor"):
                value = value.to(dt).full_tensor()  # collective over the tensor's own mesh
            if owners[key] == rank and not (tied and key == "lm_head.weight"):
                mine[key] = value.detach().to(device="cpu", dtype=dt).contiguous().clone()
    writers = sorted(set(owners.values()))
    _agreed(
        lambda: out.mkdir(parents=True, exist_ok=True), f"cannot create HF export dir {out}", rank0_only=True
    )
    name = "model.safetensors"
    if len(writers) > 1 and rank in writers:
        name = f"model-{writers.index(rank) + 1:05d}-of-{len(writers):05d}.safetensors"
    # every rank joins the agreement (even with nothing to write) so a failing writer cannot hang the rest
    _agreed(
        lambda: mine and save_file(mine, str(out / name), metadata={"format": "pt"}),
        f"HF export to {out} failed",
    )
    gathered = _all_gather(
        ({k: name for k in mine}, sum(t.numel() * t.element_size() for t in mine.values()))
    )
    if rank == 0:
        if len(writers) > 1:
            weight_map = {k: f for w, _ in gathered for k, f in w.items()}
            index = {"metadata": {"total_size": sum(n for _, n in gathered)}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        cfg = hf_model_config.__class__.from_dict(hf_model_config.to_dict())
        cfg.dtype = dt
        cfg.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        logger.info("exported HF model (%s) to %s", dt, out)
    _barrier()
    return out
