"""Host syncs and collectives of one training step (2 gloo ranks, FSDP2 dp=2 and tp=2): the loss, the
grad norm and the non-finite flags reach the host in one read after one fused all-reduce, no all-gather;
a NaN that appears on one rank only is still caught on its step and named with that rank."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from tests.dist import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list")


def _cfg(out, *extra):
    from trainer.config import load_config

    return load_config(
        os.path.join(ROOT, "configs/demo.yaml"),
        [
            f"output_dir={out}",
            f"data.cache_dir={out}/cache",
            "training.steps=3",
            "training.seq_len=64",
            "model.config.num_hidden_layers=2",
            "logging.progress=false",
            "checkpoint.export_hf=false",
            "parallel.cp=1",
            *extra,
        ],
    )


class Counter:
    """Counts, while active, host reads of tensors made by trainer/ code (the attention planner in
    parallel/cp reads the batch's positions, which are not step results) and calls of collectives."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.active = False
        for name in HOST_READS:
            self._wrap(torch.Tensor, name)
        for name in COLLECTIVES:
            self._wrap(dist, name)

    def _wrap(self, owner, name: str) -> None:
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if self.active and (owner is dist or f"{os.sep}trainer{os.sep}" in caller):
                self.counts[name] = self.counts.get(name, 0) + 1
            return real(*args, **kwargs)

        setattr(owner, name, counted)


def _steps(rank: int, world: int, tmp: str) -> dict:
    from trainer.trainer import Trainer

    counter = Counter()
    out = {}
    for name, layout in (("dp2", ["parallel.dp=2"]), ("tp2", ["parallel.dp=1", "parallel.tp=2"])):
        per_step: list[dict] = []

        class Counting(Trainer):
            counts_log = per_step

            def train_step(self, batches):
                counter.counts, counter.active = {}, True
                try:
                    return super().train_step(batches)
                finally:
                    counter.active = False
                    self.counts_log.append(dict(counter.counts))

        t = Counting(_cfg(f"{tmp}/{name}", *layout))
        t.train()
        out[name] = {"per_step": per_step, "losses": [h["loss"] for h in t.history]}

    # A NaN on rank 1 only, at step 2: stopped there, named with rank 1.
    class NanOnRank1(Trainer):
        def train_step(self, batches):
            if self.step + 1 == 2 and rank == 1:
                handle = self.model.register_forward_hook(lambda m, i, o: o * float("nan"))
                try:
                    return super().train_step(batches)
                finally:
                    handle.remove()
            return super().train_step(batches)

    try:
        NanOnRank1(_cfg(f"{tmp}/nan", "parallel.dp=2")).train()
        out["nan"] = None
    except Exception as exc:  # noqa: BLE001
        out["nan"] = f"{type(exc).__name__}: {exc}"
    return out


def test_one_host_read_and_no_gather_per_step(tmp_path):
    res = run_distributed(_steps, 2, str(tmp_path), timeout=600)
    for name in ("dp2", "tp2"):
        for counts in res[0][name]["per_step"] + res[1][name]["per_step"]:
            assert sum(counts.get(k, 0) for k in HOST_READS) == 1, (name, counts)
            assert counts.get("tolist") == 1, (name, counts)
            assert not any(counts.get(k) for k in COLLECTIVES[1:]), (name, counts)
        assert res[0][name]["losses"] == res[1][name]["losses"]  # the agreed loss, alike on every rank
    for r in (0, 1):
        msg = res[r]["nan"]
        assert msg and msg.startswith("NonFiniteError") and "step 2" in msg and "rank(s) [1]" in msg, msg
