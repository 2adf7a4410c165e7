"""ParallelDims: the validated 4D layout (pp x dp x cp x tp, cp = ring x ulysses) and its named DeviceMesh.

Mesh dimension order, outermost first: pp, dp_replicate, dp_shard, ring, ulysses, tp. The dimensions that
talk most sit innermost so consecutive ranks (same node) carry them: tp (collectives every layer), then
ulysses (all-to-all every attention), then ring (P2P, overlapped with compute), then dp (once per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from parallel.shape import ModelShape

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from trainer.config import ParallelConfig  # type only: parallel/ never imports trainer/ at run time

MESH_DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "ring", "ulysses", "tp")

# Flattened views of the mesh and why each exists:
#   dp           data sharding: CP/TP/PP peers read the same samples, only dp ranks read different ones.
#   cp           the CP group handed to attention (sequence sharding, zigzag rank = ring * ulysses + ulysses).
#   dp_shard_cp  FSDP shards parameters here: CP ranks hold identical weights, so they can share the shards
#                like extra dp ranks (replication, if any, stays on dp_replicate for HSDP).
#   dp_cp        every rank that sees different tokens of the global batch: loss token counts, gradient
#                reductions and metric averages run over it.
FLATTENED_DIMS = {
    "dp": ("dp_replicate", "dp_shard"),
    "cp": ("ring", "ulysses"),
    "dp_shard_cp": ("dp_shard", "ring", "ulysses"),
    "dp_cp": ("dp_replicate", "dp_shard", "ring", "ulysses"),
}


class ConfigError(ValueError):
    """A bad configuration value: one line, `<key>: <why>`.

    Defined here (and re-exported as `trainer.config.ConfigError`) because parallel/ never imports
    trainer/, yet the mesh checks must raise the same error type the CLI turns into exit code 2.
    """

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    ulysses: int
    world_size: int

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def sizes(self) -> tuple[int, ...]:
        """Sizes in MESH_DIM_NAMES order."""
        return (self.pp, self.dp_replicate, self.dp_shard, self.ring, self.ulysses, self.tp)

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @classmethod
    def from_config(cls, pcfg: ParallelConfig, world_size: int) -> ParallelDims:
        """Resolve the degrees of `pcfg` for `world_size` ranks (dp=-1 inferred) and check they fit.

        The world-size product is checked first: when it is wrong, no other complaint is relevant yet."""
        for key in ("tp", "pp", "cp", "dp_replicate", "ulysses"):
            if getattr(pcfg, key) < 1:
                raise ConfigError(f"parallel.{key}", f"must be >= 1, got {getattr(pcfg, key)}")
        dp = data_parallel_degree(pcfg.dp, pcfg.tp, pcfg.pp, pcfg.cp, world_size)
        ulysses = ulysses_degree(pcfg.cp_strategy, pcfg.cp, pcfg.ulysses)
        if dp % pcfg.dp_replicate:
            how = " (inferred: world size / (tp*pp*cp))" if pcfg.dp == -1 else ""
            raise ConfigError("parallel.dp_replicate", f"must divide dp={dp}{how}, got {pcfg.dp_replicate}")
        return cls(
            dp_replicate=pcfg.dp_replicate,
            dp_shard=dp // pcfg.dp_replicate,
            cp=pcfg.cp,
            tp=pcfg.tp,
            pp=pcfg.pp,
            ulysses=ulysses,
            world_size=world_size,
        )

    def validate_model(
        self,
        model: ModelShape | Any,
        seq_len: int,
        sequence_parallel: bool = False,
        strategy: str = "ring",
        layout: str = "zigzag",
    ) -> list[str]:
        """Check the model's shapes against the degrees; return notes worth logging (e.g. KV replication).

        `model` is a ModelShape or a Hugging Face config (read by attribute). Accepted head layouts:
        num_attention_heads % (tp * ulysses) == 0, and num_key_value_heads % tp == 0 (TP shards KV heads,
        it never replicates them). The kv heads of one TP rank must then either divide by ulysses, or be
        fewer than ulysses with ulysses a multiple of them: Ulysses then replicates each kv head to the
        ranks whose query heads use it. The sequence checks come first, in the order the config checks
        (trainer/config_checks.py) run them, so every path reports the same first problem.
        """
        shape = model if isinstance(model, ModelShape) else ModelShape.from_hf(model)
        check_seq_len(seq_len, self.cp, self.tp, layout, sequence_parallel)
        notes: list[str] = []
        heads, kv, layers = shape.heads, shape.kv_heads, shape.layers
        tp, u = self.tp, self.ulysses
        # Under pure Ulysses the degree is parallel.cp itself, so that is the key to change.
        u_key = "parallel.cp" if strategy == "ulysses" else "parallel.ulysses"

        if heads % kv:
            raise ConfigError(
                "model", f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}"
            )
        if heads % tp:
            raise ConfigError("parallel.tp", f"num_attention_heads={heads} is not divisible by tp={tp}")
        if (heads // tp) % u:
            fits = [d for d in range(2, self.cp) if self.cp % d == 0 and (heads // tp) % d == 0]
            hint = f"cp_strategy=hybrid with parallel.ulysses={fits[-1]}" if fits else "cp_strategy=hybrid"
            raise ConfigError(
                u_key,
                f"num_attention_heads per tp rank ({heads}/{tp} = {heads // tp}) is not divisible by the "
                f"ulysses degree {u}; use {hint} (smaller ulysses) or cp_strategy=ring",
            )
        if kv % tp:
            raise ConfigError(
                "parallel.tp",
                f"num_key_value_heads={kv} is not divisible by tp={tp} (TP shards kv heads; it does not replicate them)",
            )
        kv_local = kv // tp
        if u > 1 and kv_local % u:
            if kv_local < u and u % kv_local == 0:
                notes.append(
                    f"ulysses={u} > kv heads per tp rank ({kv_local}): each kv head is replicated "
                    f"{u // kv_local}x across the ulysses group"
                )
            else:
                raise ConfigError(
                    u_key,
                    f"kv heads per tp rank ({kv}/{tp} = {kv_local}) must be divisible by the ulysses degree {u}, "
                    f"or divide it (replication); use a smaller ulysses or cp_strategy=ring",
                )
        if self.pp > layers:
            raise ConfigError("parallel.pp", f"pp={self.pp} exceeds num_hidden_layers={layers}")
        if shape.max_positions and seq_len > shape.max_positions:
            notes.append(
                f"seq_len={seq_len} exceeds the model's max_position_embeddings={shape.max_positions}"
            )
        return notes

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of `rank`, computed from the row-major layout (no process group needed)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {self.world_size}")
        idx: dict[str, int] = {}
        rest = rank
        for name, size in reversed(list(zip(MESH_DIM_NAMES, self.sizes))):
            idx[name] = rest % size
            rest //= size
        return {
            "pp": idx["pp"],
            "dp": idx["dp_replicate"] * self.dp_shard + idx["dp_shard"],
            "dp_replicate": idx["dp_replicate"],
            "dp_shard": idx["dp_shard"],
            "cp": idx["ring"] * self.ulysses + idx["ulysses"],
            "ring": idx["ring"],
            "ulysses": idx["ulysses"],
            "tp": idx["tp"],
        }

    def rank_table(self) -> str:
        """Every rank's coordinates as an aligned text table."""
        cols = ["pp", "dp", "cp", "ring", "ulysses", "tp"]
        if self.dp_replicate > 1:
            cols[2:2] = ["dp_replicate", "dp_shard"]
        header = ["rank", *cols]
        rows = [[str(r), *(str(self.coords(r)[c]) for c in cols)] for r in range(self.world_size)]
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in [header, *rows])

    def describe(self) -> str:
        """One line: how the world size splits into the degrees."""
        dp = f"dp {self.dp}" + (
            f" (replicate {self.dp_replicate} x shard {self.dp_shard})" if self.dp_replicate > 1 else ""
        )
        return (
            f"world {self.world_size} = pp {self.pp} x {dp} x cp {self.cp} "
            f"(ring {self.ring} x ulysses {self.ulysses}) x tp {self.tp}"
        )

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Create the 6D named DeviceMesh plus its flattened views (see FLATTENED_DIMS).

        Needs an initialised default process group of exactly `world_size` ranks. Size-1 dimensions are
        kept so every name always exists (a size-1 sub-mesh is a valid single-rank group).
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if dist.is_initialized() and dist.get_world_size() != self.world_size:
            raise ConfigError(
                "parallel", f"process group has {dist.get_world_size()} ranks, mesh needs {self.world_size}"
            )
        mesh = init_device_mesh(device_type, self.sizes, mesh_dim_names=MESH_DIM_NAMES)
        for name, dims in FLATTENED_DIMS.items():
            mesh[dims]._flatten(name)
        return mesh


def sub_mesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """The 1D sub-mesh `name` of a mesh from `build_mesh`, flattened names included.

    Prefer this to `mesh[name]` for flattened names: slicing a flattened dim from the root mesh warns
    (deprecated since torch 2.11), while re-flattening returns the mesh cached by `build_mesh`.
    """
    if name in FLATTENED_DIMS:
        return mesh[FLATTENED_DIMS[name]]._flatten(name)
    return mesh[name]


def sub_rank_and_size(mesh: DeviceMesh, name: str) -> tuple[int, int]:
    """This rank's index in, and the size of, the (possibly flattened) mesh dimension `name`."""
    sub = sub_mesh(mesh, name)
    return sub.get_local_rank(), sub.size()


def data_parallel_degree(dp: int, tp: int, pp: int, cp: int, world_size: int) -> int:
    """dp for `world_size` ranks (dp=-1: inferred); a ConfigError when dp*tp*pp*cp cannot be the world."""
    if world_size < 1:
        raise ConfigError("WORLD_SIZE", f"must be >= 1, got {world_size}")
    inner = tp * pp * cp
    if dp == -1:
        if world_size % inner:
            raise ConfigError(
                "parallel.dp",
                f"cannot infer dp: world size {world_size} is not divisible by tp*pp*cp = {inner}",
            )
        return world_size // inner
    if dp < 1:
        raise ConfigError("parallel.dp", f"must be >= 1 or -1 (infer), got {dp}")
    if dp * inner != world_size:
        raise ConfigError("parallel.dp", f"dp*tp*pp*cp = {dp * inner} does not match world size {world_size}")
    return dp


def holds_whole_weights(tp: int, fsdp_shards: int, cpu_offload: bool) -> bool:
    """Each rank keeps every weight whole on its GPU: no TP, FSDP over `fsdp_shards` = 1 rank (dp_shard x
    cp; replicas hold whole weights) and no FSDP CPU offload (training.fp8_cache_frozen's condition)."""
    return tp == 1 and fsdp_shards == 1 and not cpu_offload


def fp8_all_gather(cfg) -> bool:
    """FSDP2 all-gathers FP8 weights: training.fp8 with tensorwise scaling (torchao has no rowwise FP8
    all-gather) under the fsdp2 engine, unless training.fp8_all_gather is off. `cfg`: a trainer Config,
    read by attribute; the one rule for models/parallelize, the engine and the planner."""
    t = cfg.training
    return (
        bool(getattr(t, "fp8", False))
        and t.fp8_recipe == "tensorwise"
        and t.fp8_all_gather
        and getattr(cfg.parallel, "engine", "fsdp2") == "fsdp2"
    )


def ulysses_degree(strategy: str, cp: int, ulysses: int) -> int:
    """The Ulysses degree of a concrete CP strategy: 1 for ring, cp for ulysses, `ulysses` for hybrid."""
    if strategy == "hybrid":
        if not 1 < ulysses < cp or cp % ulysses:
            raise ConfigError(
                "parallel.ulysses",
                f"cp_strategy=hybrid needs 1 < ulysses < cp and cp % ulysses == 0 (got ulysses={ulysses}, "
                f"cp={cp}); use ring or ulysses for a pure strategy",
            )
        return ulysses
    if strategy not in ("ring", "ulysses"):
        raise ConfigError("parallel.cp_strategy", f"must be ring | ulysses | hybrid, got {strategy!r}")
    if ulysses != 1:
        what = "ulysses uses ulysses=cp" if strategy == "ulysses" else "ring uses ulysses=1"
        raise ConfigError("parallel.ulysses", f"only used with cp_strategy=hybrid ({what}); leave it at 1")
    return cp if strategy == "ulysses" else 1


def check_seq_len(
    seq_len: int, cp: int, tp: int, layout: str = "zigzag", sequence_parallel: bool = False
) -> None:
    """training.seq_len must split into the CP shards (2*cp zigzag chunks) and, with sequence parallel,
    each CP shard over tp."""
    if cp > 1:
        chunks = 2 * cp if layout == "zigzag" else cp
        if seq_len % chunks:
            what = "2*cp" if layout == "zigzag" else "cp"
            raise ConfigError(
                "training.seq_len", f"{seq_len} is not divisible by {what} = {chunks} (cp_layout={layout})"
            )
    if sequence_parallel and tp > 1 and (seq_len // cp) % tp:
        raise ConfigError(
            "training.seq_len",
            f"tokens per cp rank ({seq_len}/{cp} = {seq_len // cp}) must be divisible by "
            f"tp={tp} with sequence_parallel",
        )
