"""The training loop. Built from small parts: validation, mesh and model stage (trainer/run_setup, shared with
--eval-only's trainer/eval_only), an engine that shards and steps the stage (trainer/engine), data
(trainer/data), checkpoints, metrics."""

from __future__ import annotations

import logging
import time

import torch

from models.registry import DTYPES
from trainer import distributed
from trainer.checkpoint import Checkpointer
from trainer.checkpoint_state import JsonState, capture_rng_state, restore_rng_state, train_state
from trainer.config import Config, config_to_dict
from trainer.data import build_dataloader
from trainer.engine import EngineContext, build_engine
from trainer.metrics import MetricsLogger, device_peak_flops
from trainer.optim import build_scheduler
from trainer.run_setup import RunSetup
from trainer.signals import StopSignal
from trainer.step import StepResult

log = logging.getLogger("longctx")


class Trainer(RunSetup):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.engine = build_engine(self.cfg, self._build_stage(), self._engine_context())
        self.model, self.optimizer = self.engine.stage, self.engine.optimizer
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.cfg.training.steps)
        self.loader = build_dataloader(self.cfg, self.tokenizer, self.dp_rank, self.dp_size, rank=self.rank)
        self.checkpointer = self._build_checkpointer()
        self.evaluator = self._build_evaluator()
        self.step = 0
        self.skipped_steps = 0
        self.history: list[dict] = []  # per-step metrics of this process (tests and notebooks read it)
        self.evaluations: list[dict] = []  # records of this process's evaluations (eval.jsonl on rank 0)
        self.stop = StopSignal(self.rank)

    def _engine_context(self) -> EngineContext:
        return EngineContext(
            self.mesh, self.dims, self.device, self.family.parallelize, fill=self._fill_stage
        )

    def _build_checkpointer(self) -> Checkpointer:
        layout = {k: getattr(self.dims, k) for k in ("pp", "dp_replicate", "dp_shard", "cp", "ulysses", "tp")}
        layout["engine"] = self.engine.name
        return Checkpointer(
            self.cfg.checkpoint,
            self.out,
            layout=layout,
            model_config=self.hf_config,
            native=self.engine.native_checkpoint,
        )

    @property
    def groups(self):
        return self.engine.groups

    # ---- one optimizer step ---------------------------------------------------------------------
    def _micro_batches(self) -> tuple[list[dict[str, torch.Tensor]], float]:
        t0 = time.perf_counter()
        batches = [next(self.loader) for _ in range(self.cfg.training.grad_accum)]
        return batches, time.perf_counter() - t0

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepResult:
        result = self.engine.step(batches, self.step, self.skipped_steps)
        self.skipped_steps += int(result.skipped)
        self.scheduler.step()
        return result

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoint_entries(self) -> dict:
        """The run's DCP entries: the engine's (model, optimizer), the step, scheduler and counters, and
        each rank's data position and RNG states."""
        return {
            **self.engine.checkpoint_entries(),
            "train": train_state(
                lambda: self.step,
                self.scheduler,
                lambda: {"skipped_steps": self.skipped_steps},
                self._put_counters,
            ),
            "rank": JsonState(self._rank_state, self._put_rank_state, per_rank=True),
        }

    def _rank_state(self) -> dict:
        return {"data": self.loader.state_dict(), "rng": capture_rng_state()}

    def _put_rank_state(self, sd: dict) -> None:
        self.loader.load_state_dict(sd["data"])
        if self.checkpointer.saved_layout.get("world_size") == self.world and "rng" in sd:
            restore_rng_state(sd["rng"])  # another world size: the RNG streams do not map to ranks

    def _put_counters(self, sd: dict) -> None:
        self.skipped_steps = sd.get("skipped_steps", 0)

    def save(self) -> None:
        self.checkpointer.save_state(self.step, self.checkpoint_entries())

    def resume(self) -> bool:
        """Load the checkpoint `checkpoint.resume` names, if any; False when it already is at (or past)
        training.steps: then nothing is loaded and nothing is left to train."""
        path = self.checkpointer.find_resume()
        if path is None:
            return True
        saved_step = self.checkpointer.step_of(path)
        if saved_step >= self.cfg.training.steps:
            self._already_complete(saved_step)
            return False
        self.step = self.checkpointer.load_state(path, self.checkpoint_entries())
        log.info("resumed from step %d", self.step)
        return True

    def _already_complete(self, step: int) -> None:
        """A re-run of a finished run: nothing to train, and its summary, export and metrics stay."""
        steps = self.cfg.training.steps
        where = "already holds" if step == steps else f"is past training.steps={steps}:"
        log.warning(
            "run complete: %s %s step %d. To train further, raise training.steps (e.g. training.steps=%d "
            "continues from step %d); to start over, use a new output_dir",
            self.out,
            where,
            step,
            2 * step,
            step,
        )

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        if not self.resume():
            return {}
        metrics = MetricsLogger(
            cfg,
            self.out,
            self.rank,
            self.world,
            config_to_dict(cfg),
            flops_per_token=self.kind.flops_per_token(self.hf_config, cfg.training.seq_len),
            peak_flops=device_peak_flops(self.device, DTYPES[cfg.model.dtype]),
            start_step=self.step,
        )
        last = {}
        try:
            while self.step < cfg.training.steps:
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                t0 = time.perf_counter()
                batches, data_time = self._micro_batches()
                result = self.train_step(batches)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.step += 1
                if self.step == 1:
                    distributed.shorten_timeout(cfg.training.step_timeout_min)
                last = {
                    "loss": result.loss,
                    "grad_norm": result.grad_norm,
                    "lr": self.scheduler.get_last_lr()[0],
                    "tokens": self.tokens_per_step,
                    "step_time_s": time.perf_counter() - t0,
                    "data_time_s": data_time,
                    "peak_mem_gib": (
                        torch.cuda.max_memory_allocated(self.device) / 2**30
                        if self.device.type == "cuda"
                        else None
                    ),
                    "skipped": result.skipped,
                }
                if self.step == 1:
                    last.update(self.stage_loader.stats)  # the model load's time and peak memory, once
                self.history.append({"step": self.step, **last})
                metrics.log(self.step, last)
                if self.evaluator is not None and self.evaluator.due(self.step, cfg.training.steps):
                    self.evaluations.append(self.evaluator.run(self.step, metrics))
                interval = cfg.checkpoint.interval
                if interval and self.step % interval == 0 and self.step < cfg.training.steps:
                    self.save()
                if self.stop.agreed(self.device):
                    log.info("%s received: saving step %d and exiting", self.stop.name, self.step)
                    self.save()
                    self.checkpointer.wait()
                    return last
            self.save()
            self.checkpointer.wait()
            self.kind.export(self.engine, self.hf_config, self.tokenizer, self.out, cfg.checkpoint)
            metrics.summary({"final_step": self.step, "final_loss": last.get("loss")})
        finally:
            metrics.close()
        return last
