"""Sequence sharding for context parallelism: which global tokens each CP rank holds.

zigzag (head-tail): the sequence is cut into 2*cp chunks and CP rank r holds chunks r and 2*cp-1-r, so
every rank does the same amount of causal attention work. contiguous: rank r holds chunk r of cp.

Tokens, labels, position ids and document ids are all cut with the same index, so a shard is just
`x.index_select(dim, shard_index(...))`; labels must already be shifted on the full sequence.
The CP rank is the flattened (ring, ulysses) coordinate, ulysses innermost, which makes a Ulysses group
hold one contiguous zigzag "super-chunk" pair - exactly what the ring across groups expects.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")


def num_chunks(cp: int, layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown CP layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    return 2 * cp if layout == "zigzag" else cp


def check_divisible(seq_len: int, cp: int, layout: str) -> None:
    n = num_chunks(cp, layout)
    if seq_len % n:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by {n} ({layout} layout with cp={cp} cuts "
            f"{n} chunks); pad the sequence or pick training.seq_len as a multiple of {n}"
        )


def rank_chunks(cp: int, rank: int, layout: str) -> list[int]:
    """Chunk ids held by `rank`, in local order."""
    return [rank, 2 * cp - 1 - rank] if num_chunks(cp, layout) == 2 * cp else [rank]


def shard_index(seq_len: int, cp: int, rank: int, layout: str, device=None) -> torch.Tensor:
    """Global token indices held by CP `rank`, in local order (int64, [seq_len // cp])."""
    check_divisible(seq_len, cp, layout)
    size = seq_len // num_chunks(cp, layout)
    return torch.cat(
        [torch.arange(c * size, (c + 1) * size, device=device) for c in rank_chunks(cp, rank, layout)]
    )


def shard(x: torch.Tensor, cp: int, rank: int, layout: str, dim: int = 1) -> torch.Tensor:
    """This rank's shard of a full-sequence tensor (sequence along `dim`)."""
    if cp == 1:
        return x
    return x.index_select(dim, shard_index(x.shape[dim], cp, rank, layout, x.device)).contiguous()


def unshard(shards: list[torch.Tensor], layout: str, dim: int = 1) -> torch.Tensor:
    """Inverse of `shard`: rebuild the full sequence from every rank's shard (rank order)."""
    cp = len(shards)
    local = shards[0].shape[dim]
    seq_len = local * cp
    index = torch.cat([shard_index(seq_len, cp, r, layout, shards[0].device) for r in range(cp)])
    stacked = torch.cat(shards, dim=dim)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(seq_len, device=index.device)
    return stacked.index_select(dim, inverse)


def gather(x: torch.Tensor, group: dist.ProcessGroup, layout: str, dim: int = 1) -> torch.Tensor:
    """All-gather the shards of a CP group and restore the full sequence (for tests and evaluation)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard(parts, layout, dim)


def shard_batch(
    batch: dict[str, torch.Tensor], cp: int, rank: int, layout: str, device=None
) -> dict[str, torch.Tensor]:
    """Shard every [batch, seq] tensor of a batch (input_ids, labels, position_ids, doc_ids, ...), then move
    the shards (not the full sequences) to `device`."""
    out = {k: shard(v, cp, rank, layout, dim=1) if v.dim() >= 2 else v for k, v in batch.items()}
    return out if device is None else {k: v.to(device, non_blocking=True) for k, v in out.items()}
