"""The training loop. Built from small parts: validation, mesh (parallel/dims), model stage (models/), an
engine that shards and steps it (trainer/engine), data (trainer/data), checkpoints, metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import torch
from torch import nn

from models.causal_lm import CausalLMStage
from models.registry import DTYPES, family_of
from parallel.dims import sub_mesh, sub_rank_and_size
from trainer import distributed
from trainer.checkpoint import Checkpointer, check_writable
from trainer.checkpoint_state import JsonState, capture_rng_state, restore_rng_state, train_state
from trainer.config import Config, config_to_dict, save_config
from trainer.data import build_dataloader, load_tokenizer
from trainer.engine import EngineContext, build_engine, stage_build
from trainer.errors import ModelLoadError, one_line
from trainer.evaluate import build_evaluator, load_weights_for_eval
from trainer.layout import check_vocab, validate_run
from trainer.logging_utils import setup_logging
from trainer.metrics import MetricsLogger, device_peak_flops
from trainer.model_build import StageLoader
from trainer.optim import build_scheduler
from trainer.signals import StopSignal
from trainer.step import StepResult

log = logging.getLogger("longctx")


class Trainer:
    def __init__(self, cfg: Config, eval_only: bool = False):
        self.cfg = cfg
        self.eval_only = eval_only
        self._start()
        self._validate()  # everything that can reject the run, before any weights or data are loaded
        self._record_config()
        self._build_mesh()
        if eval_only:  # --eval-only: the stage sharded as for FSDP2 training, no engine (optimizer) or data
            self._build_for_eval()
            return
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

    # ---- construction ---------------------------------------------------------------------------
    def _start(self) -> None:
        cfg = self.cfg
        self.out = Path(cfg.output_dir)
        self.device = distributed.pick_device(cfg.training.device, cfg.training.expandable_segments)
        self.rank, self.world = distributed.init_distributed(self.device, cfg.training.init_timeout_min)
        check_writable(self.out)  # before anything is written or loaded: one line if it can't be
        setup_logging(self.out, self.rank)

    def _validate(self) -> None:
        cfg = self.cfg
        # Everything that can reject the run does so before any weights or data are loaded.
        run = validate_run(cfg, self.world, device_type=self.device.type)
        cfg = self.cfg = run.cfg  # parallel.auto / cp_strategy=auto filled in
        self.tokenizer = load_tokenizer(cfg)  # the last check needs it, and the run keeps it
        check_vocab(cfg, run.hf_config, self.tokenizer)
        self.hf_config, self.dims, self.family = run.hf_config, run.dims, family_of(run.hf_config)
        self.kind = run.kind  # full fine-tuning or LoRA (trainer/training_kind.py)
        for note in run.notes:
            log.info("layout note: %s", note)
        for warning in run.warnings:
            log.warning("%s", warning)

    def _record_config(self) -> None:
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            saved = self.out / ("eval/config.yaml" if self.eval_only else "config.yaml")  # keep the run's own
            save_config(self.cfg, saved)
            log.info("resolved config:\n%s", saved.read_text())
            log.info("mesh: %s", self.dims.describe())

    def _build_mesh(self) -> None:
        cfg, dims = self.cfg, self.dims
        self.mesh = dims.build_mesh(self.device.type)
        self.dp_rank, self.dp_size = sub_rank_and_size(self.mesh, "dp")
        t = cfg.training
        self.tokens_per_step = t.seq_len * t.micro_batch_size * t.grad_accum * dims.dp
        if dims.cp > 1:
            log.info(
                "context parallelism active: %s cp=%d (ring=%d x ulysses=%d), %s layout, %d tokens/rank",
                cfg.parallel.cp_strategy,
                dims.cp,
                dims.ring,
                dims.ulysses,
                cfg.parallel.cp_layout,
                t.seq_len // dims.cp,
            )

    def _build_stage(self) -> CausalLMStage:
        """This rank's pipeline stage of the model, without weights yet: the engine parallelises it, then
        calls `_fill_stage` (trainer/model_build.py: each rank materialises and fills only its shards)."""
        cfg = self.cfg
        # --eval-only shards the stage as FSDP2 training does, whatever engine trained it.
        builder, dtype = stage_build(cfg, self.mesh, "fsdp2" if self.eval_only else None)
        # The training kind may change the build (LoRA: a frozen base in model.dtype, adapters injected).
        options = {"builder": builder, "dtype": dtype, **self.kind.stage_options()}
        self.stage_loader = StageLoader(cfg, self.hf_config, self.device, **options)
        with self._model_errors():
            return self.stage_loader.build(sub_mesh(self.mesh, "pp").get_local_rank(), self.dims.pp)

    def _fill_stage(self, stage: nn.Module) -> None:
        with self._model_errors():
            self.stage_loader.fill(stage)

    @contextlib.contextmanager
    def _model_errors(self):
        try:
            yield
        except (OSError, ValueError) as exc:
            cfg = self.cfg
            where = f"model.path {cfg.model.path!r}" if cfg.model.path else "model.config"
            raise ModelLoadError(f"{where}: could not build the model: {one_line(exc)}") from None

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

    def _build_evaluator(self):
        return build_evaluator(self.cfg, self.model, self.tokenizer, self.mesh, self.device, self.out)

    def _build_for_eval(self) -> None:
        self.model = self._build_stage()
        self.family.parallelize(self.model, self.mesh, self.dims, self.cfg)  # as Fsdp2Engine does
        self._fill_stage(self.model)
        # Only the engine name of a checkpoint's layout is checked on load; eval reads FSDP2 checkpoints.
        self.checkpointer = Checkpointer(
            self.cfg.checkpoint, self.out, layout={"engine": "fsdp2"}, model_config=self.hf_config
        )
        self.evaluator = self._build_evaluator()

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
                if self.step == 1 and self.stage_loader is not None:
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

    def evaluate_only(self) -> dict:
        """`train.py --eval-only`: evaluate the newest checkpoint (or model.path) once; no training step."""
        self.step, weights = load_weights_for_eval(self.checkpointer, self.model, self.cfg.model.path)
        logging_cfg = dataclasses.replace(self.cfg.logging, progress=False)
        metrics = MetricsLogger(logging_cfg, self.out, self.rank, self.world, config_to_dict(self.cfg))
        try:
            record = self.evaluator.run(self.step, metrics, weights)
        finally:
            metrics.close()
        self.evaluations = [record]
        return record
