"""Every way to lay a world of N ranks out as dp x tp x pp x cp, with cp = ulysses x ring, zigzag or contiguous.

Validity is decided by the same code the trainer runs (`ParallelDims.from_config` + parallel/layout_checks),
so a layout the planner calls valid is one the trainer accepts; the reason of an invalid one is the exact
one-line error the trainer would print (`model` may be a Hugging Face config or a ModelShape).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from parallel.dims import ConfigError, ParallelDims
from parallel.layout_checks import RunSettings
from parallel.layout_checks import check_layout as check_run_layout
from parallel.shape import ModelShape

# Set to False to keep pipeline layouts out of the plan (they are still listed, as invalid).
PP_SUPPORTED = True
LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    cp: int
    ulysses: int
    cp_layout: str | None
    """zigzag | contiguous; None when cp == 1 (nothing is sharded)."""

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    @property
    def strategy(self) -> str:
        """ring | ulysses | hybrid as `parallel.cp_strategy` spells it ("ring" for cp == 1, a no-op)."""
        if self.ulysses == 1:
            return "ring"
        return "ulysses" if self.ulysses == self.cp else "hybrid"

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def label(self) -> str:
        return f"dp{self.dp} tp{self.tp} pp{self.pp} cp{self.cp}"

    def strategy_label(self) -> str:
        if self.cp == 1:
            return "-"
        lay = "zigzag" if self.cp_layout == "zigzag" else "contig"
        split = {"ring": f"r{self.ring}", "ulysses": f"u{self.ulysses}"}.get(
            self.strategy, f"u{self.ulysses}xr{self.ring}"
        )
        return f"{self.strategy} {split} {lay}"

    def parallel_fields(self) -> dict[str, Any]:
        """The `parallel.*` values that select this layout (cp_layout omitted when cp == 1)."""
        out: dict[str, Any] = dict(
            dp=self.dp,
            tp=self.tp,
            pp=self.pp,
            cp=self.cp,
            cp_strategy=self.strategy,
            ulysses=self.ulysses if self.strategy == "hybrid" else 1,
        )
        if self.cp_layout is not None:
            out["cp_layout"] = self.cp_layout
        return out


@dataclass
class Candidate:
    layout: Layout
    reason: str | None = None
    """Why the trainer would reject it (None = valid)."""
    notes: list[str] = field(default_factory=list)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def cp_splits(cp: int) -> list[int]:
    """Ulysses degrees of a cp group: 1 (ring), every proper divisor (hybrid), cp (ulysses)."""
    return divisors(cp) if cp > 1 else [1]


def check_layout(
    layout: Layout,
    model: ModelShape,
    seq_len: int,
    *,
    sequence_parallel: bool = False,
    sequences_per_step: int | None = None,
    pp_microbatches: int | None = None,
    pp_schedule: str = "1F1B",
    pp_supported: bool = PP_SUPPORTED,
) -> Candidate:
    """Run the trainer's own layout checks on one layout; a ConfigError becomes the candidate's reason.

    `sequences_per_step` = grad_accum * micro_batch_size: under PP they are the pipeline's microbatches
    (pp_microbatches of them, default one sequence each), as trainer/trainer.py splits them; None skips
    the micro-batch checks (a plan for the model alone).
    """
    pcfg = SimpleNamespace(dp_replicate=1, **layout.parallel_fields())
    run = RunSettings(
        seq_len,
        sequence_parallel=sequence_parallel,
        cp_layout=layout.cp_layout or "zigzag",
        sequences_per_step=sequences_per_step,
        pp_microbatches=pp_microbatches,
        pp_schedule=pp_schedule,
    )
    cand = Candidate(layout)
    try:
        if layout.pp > 1 and not pp_supported:
            raise ConfigError("parallel.pp", "pipeline parallelism is left out of this plan")
        cand.notes = check_run_layout(ParallelDims.from_config(pcfg, layout.world_size), model, run)
    except ConfigError as exc:
        cand.reason = str(exc)
    return cand


def enumerate_layouts(
    world_size: int,
    model: ModelShape | Any,
    seq_len: int,
    *,
    sequence_parallel: bool = False,
    sequences_per_step: int | None = None,
    pp_microbatches: int | None = None,
    pp_schedule: str = "1F1B",
    fixed: dict[str, int] | None = None,
    pp_supported: bool = PP_SUPPORTED,
) -> list[Candidate]:
    """All (dp, tp, pp, cp, ulysses, layout) with dp*tp*pp*cp == world_size, valid or not.

    `fixed` pins some of dp/tp/pp/cp (cp_strategy=auto keeps the user's degrees and picks only the CP
    split). cp == 1 yields one layout (no split, no sharding layout).
    """
    fixed = fixed or {}
    shape = model if isinstance(model, ModelShape) else ModelShape.from_hf(model)
    out: list[Candidate] = []
    for tp in divisors(world_size):
        for pp in divisors(world_size // tp):
            for cp in divisors(world_size // (tp * pp)):
                dp = world_size // (tp * pp * cp)
                degrees = dict(dp=dp, tp=tp, pp=pp, cp=cp)
                if any(degrees[k] != v for k, v in fixed.items()):
                    continue
                for u in cp_splits(cp):
                    for lay in LAYOUTS if cp > 1 else (None,):
                        layout = Layout(dp, tp, pp, cp, u, lay)
                        out.append(
                            check_layout(
                                layout,
                                shape,
                                seq_len,
                                sequence_parallel=sequence_parallel,
                                sequences_per_step=sequences_per_step,
                                pp_microbatches=pp_microbatches,
                                pp_schedule=pp_schedule,
                                pp_supported=pp_supported,
                            )
                        )
    return out
