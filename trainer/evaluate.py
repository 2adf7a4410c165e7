"""Evaluation under the training mesh: held-out loss, loss by position and passkey retrieval.

Every forward runs the training model (FSDP2, TP, CP strategy and layout) under `torch.no_grad`, where
the stage's activation checkpointing, tiled-MLP recompute and activation offload are all off (they act
only when autograd records), and ends in the chunked per-token loss + arg-max (full-vocabulary logits
exist for one chunk at a time). Held-out loss = sum of token losses over valid targets / their count
over all dp x cp ranks - the training loss's normalisation - so it equals the unsharded model's value.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from parallel.cp.sharding import shard_batch, shard_index
from parallel.dims import ConfigError, sub_rank_and_size
from trainer.data import prepare_dataset
from trainer.data.packing import IGNORE, num_windows, window_from_store
from trainer.eval_checks import eval_enabled, passkey_lengths, validate_eval
from trainer.passkey import make_trials, trial_batch, trial_result
from trainer.step import StepGroups

log = logging.getLogger("longctx")


def position_edges(seq_len: int) -> list[int]:
    """Bucket edges over the position inside a document: [0, b), [b, 2b), [2b, 4b), ... up to seq_len, with
    b = 1024 from seq_len 8192 on (shorter runs: seq_len / 8 rounded down to a power of two)."""
    base = 1024 if seq_len >= 8192 else max(1, 1 << max(0, (seq_len // 8).bit_length() - 1))
    edges, e = [0], base
    while e < seq_len:
        edges.append(e)
        e *= 2
    return edges + [seq_len]


class Evaluator:
    """Built once per run on every rank (collective: held-out tokenisation waits for rank 0); `run(step)`
    is collective too and returns the evaluation's record (the same on every rank)."""

    def __init__(self, cfg: Any, model: Any, tokenizer: Any, mesh: Any, device: torch.device, out: Path):
        self.cfg, self.model, self.tokenizer, self.device, self.out = cfg, model, tokenizer, device, out
        self.groups = StepGroups.from_mesh(mesh)
        self.dp_rank, self.dp_size = sub_rank_and_size(mesh, "dp")
        self.rank = dist.get_rank()
        validate_eval(cfg, cp=self.groups.cp_size)  # again: parallel.auto may have changed cp
        self.seq_len = cfg.training.seq_len
        self.edges = position_edges(self.seq_len)
        self.store, self.num_sequences = None, 0
        if cfg.eval.path is not None:
            data = dataclasses.replace(cfg.data, path=cfg.eval.path, streaming=False, shuffle=False)
            self.store = prepare_dataset(dataclasses.replace(cfg, data=data), tokenizer, self.rank)
            self.num_sequences = num_windows(self.store.n_tokens, self.seq_len)
            if self.num_sequences == 0:
                raise ConfigError(
                    "eval.path",
                    f"{cfg.eval.path} has {self.store.n_tokens} tokens, fewer than training.seq_len + 1 = "
                    f"{self.seq_len + 1}",
                )
            if cfg.eval.max_sequences is not None:
                self.num_sequences = min(self.num_sequences, cfg.eval.max_sequences)
        self.trials = []
        if cfg.eval.passkey:
            self.trials = make_trials(
                tokenizer, passkey_lengths(cfg), list(cfg.eval.passkey_depths), cfg.training.seed
            )

    def due(self, step: int, total_steps: int) -> bool:
        every = self.cfg.eval.every
        return step == total_steps or (every > 0 and step % every == 0)

    # ---- forward ----------------------------------------------------------------------------------
    def _scores(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        g = self.groups
        b = shard_batch(batch, g.cp_size, g.cp_rank, self.cfg.parallel.cp_layout, self.device)
        losses, preds = self.model(
            b["input_ids"], b["position_ids"], b["doc_ids"], b["labels"], per_token=True
        )
        return b, losses, preds

    def _sum_over_dp_cp(self, t: torch.Tensor) -> torch.Tensor:
        # dp x cp only: TP ranks hold the same tokens and would count them twice.
        if dist.get_world_size(self.groups.dp_cp_group) > 1:
            dist.all_reduce(t, group=self.groups.dp_cp_group)
        return t

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- held-out loss ----------------------------------------------------------------------------
    def _my_sequences(self) -> list[list[int | None]]:
        """This dp rank's micro-batches of held-out sequence indices; every rank gets as many batches (FSDP
        gathers over dp), short ones padded with None (a sequence with no targets)."""
        mbs = self.cfg.training.micro_batch_size
        mine = list(range(self.dp_rank, self.num_sequences, self.dp_size))
        per_rank = -(-self.num_sequences // self.dp_size)
        rounds = -(-per_rank // mbs)
        mine += [None] * (rounds * mbs - len(mine))
        return [mine[i : i + mbs] for i in range(0, len(mine), mbs)]

    def _sequence(self, k: int | None) -> dict:
        s = self.store
        seq = window_from_store(s.tokens, s.labels, s.offsets, k or 0, self.seq_len, self.cfg.data.doc_mask)
        if k is None:
            seq["labels"][:] = IGNORE
        return seq

    def held_out(self) -> dict[str, Any]:
        n_buckets = len(self.edges) - 1
        # [loss sum, target count, per-bucket loss sums, per-bucket counts], float64 like the training loss
        stats = torch.zeros(2 + 2 * n_buckets, dtype=torch.float64, device=self.device)
        inner = torch.tensor(self.edges[1:-1], device=self.device)
        self._sync()
        t0 = time.perf_counter()
        for ks in self._my_sequences():
            seqs = [self._sequence(k) for k in ks]
            batch = {key: torch.from_numpy(np.stack([s[key] for s in seqs])) for key in seqs[0]}
            b, losses, _ = self._scores(batch)
            valid = b["labels"] != IGNORE
            loss = losses[valid].double()
            bucket = torch.bucketize(b["position_ids"][valid], inner, right=True)
            stats[0] += loss.sum()
            stats[1] += valid.sum()
            stats[2 : 2 + n_buckets].index_add_(0, bucket, loss)
            stats[2 + n_buckets :].index_add_(0, bucket, torch.ones_like(loss))
        self._sum_over_dp_cp(stats)
        self._sync()
        elapsed = time.perf_counter() - t0
        total, count = stats[0].item(), stats[1].item()
        loss = total / max(count, 1)
        buckets = []
        for i in range(n_buckets):
            n = stats[2 + n_buckets + i].item()
            buckets.append(
                {
                    "from": self.edges[i],
                    "to": self.edges[i + 1],
                    "loss": stats[2 + i].item() / n if n else None,
                    "targets": int(n),
                }
            )
        tokens = self.num_sequences * self.seq_len
        return {
            "eval_loss": loss,
            "eval_ppl": math.exp(min(loss, 700.0)),
            "eval_tokens": tokens,
            "eval_targets": int(count),
            "eval_sequences": self.num_sequences,
            "eval_time_s": elapsed,
            "eval_tokens_per_s": tokens / elapsed if elapsed > 0 else None,
            "loss_by_position": buckets,
        }

    # ---- passkey ----------------------------------------------------------------------------------
    def passkey(self) -> dict[str, Any]:
        """Each dp rank scores every dp_size-th trial (CP splits each one); the arg-max tokens at the
        answer positions are summed into one table over dp x cp (each entry has exactly one owner)."""
        g, layout = self.groups, self.cfg.parallel.cp_layout
        width = max(len(t.answer_ids) for t in self.trials)
        table = torch.zeros(len(self.trials), width, dtype=torch.int64, device=self.device)
        mine = list(range(self.dp_rank, len(self.trials), self.dp_size))
        rounds = -(-len(self.trials) // self.dp_size)
        self._sync()
        t0 = time.perf_counter()
        for j in range(rounds):
            i = mine[j] if j < len(mine) else None  # None: a repeat forward whose answer is dropped
            trial = self.trials[i if i is not None else (mine[-1] if mine else 0)]
            _, _, preds = self._scores(trial_batch(trial))
            if i is None:
                continue
            n = trial.length
            local = shard_index(n, g.cp_size, g.cp_rank, layout, self.device) if g.cp_size > 1 else None
            for a, pos in enumerate(trial.answer_positions.tolist()):
                hit = (local == pos).nonzero() if local is not None else torch.tensor([[pos]])
                if len(hit):
                    table[i, a] = preds[0, int(hit[0, 0])] + 1  # +1: 0 marks "not held here"
        self._sum_over_dp_cp(table)
        self._sync()
        elapsed = time.perf_counter() - t0
        rows = table.cpu().tolist()
        results = [
            trial_result(t, [v - 1 for v in row[: len(t.answer_ids)]], self.tokenizer)
            for t, row in zip(self.trials, rows)
        ]
        accuracy = sum(r["passed"] for r in results) / len(results)
        return {"accuracy": accuracy, "time_s": elapsed, "trials": results}

    # ---- one evaluation ---------------------------------------------------------------------------
    def run(self, step: int, metrics: Any = None, weights: str | None = None) -> dict[str, Any]:
        """One evaluation; `weights` (--eval-only) names the checkpoint or model evaluated."""
        from trainer.eval_report import report

        was_training = self.model.training
        self.model.eval()  # dropout off
        try:
            with torch.no_grad():
                record: dict[str, Any] = {"step": step, **({"weights": weights} if weights else {})}
                if self.store is not None:
                    record.update(self.held_out())
                passkey = self.passkey() if self.trials else None
        finally:
            self.model.train(was_training)
        if passkey is not None:
            record["passkey_accuracy"] = passkey["accuracy"]
            record["passkey_time_s"] = passkey["time_s"]
        if self.rank == 0:
            report(self.out, record, passkey, metrics)
        return {**record, "passkey": passkey} if passkey is not None else record


def build_evaluator(cfg: Any, model: Any, tokenizer: Any, mesh: Any, device: torch.device, out: Path):
    """The run's Evaluator, or None when the config asks for no evaluation."""
    return Evaluator(cfg, model, tokenizer, mesh, device, out) if eval_enabled(cfg) else None


def load_weights_for_eval(checkpointer: Any, model: Any, model_path: str | None) -> tuple[int, str]:
    """--eval-only: load the model weights (never the optimizer) of the checkpoint `checkpoint.resume`
    names - auto: the newest complete one in output_dir - and return (its step, its path); (0, model.path
    or "model.config") and the weights already built when there is none. Collective."""
    from trainer.checkpoint_state import ModelState

    path = checkpointer.find_resume()
    if path is None:
        what = f"model.path {model_path}" if model_path else "the randomly initialised model.config"
        log.info("eval-only: no checkpoint in %s; evaluating %s", checkpointer.root, what)
        return 0, model_path or "model.config"
    step = checkpointer.load_state(path, {"model": ModelState([model])})
    log.info("eval-only: evaluating the weights of checkpoint %s (step %d)", path, step)
    return step, str(path)
