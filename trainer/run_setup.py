"""What every run does before its first step, training or `--eval-only`: start the process group,
validate (everything that can reject the run, before any weights or data are loaded), record the config,
build the mesh and this rank's model stage, filled from model.path or a seeded init."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from torch import nn

from models.causal_lm import CausalLMStage
from models.registry import family_of
from parallel.dims import sub_mesh, sub_rank_and_size
from trainer import distributed
from trainer.checkpoint import check_writable
from trainer.config import Config, save_config
from trainer.data import load_tokenizer
from trainer.engine import stage_build
from trainer.errors import ModelLoadError, one_line
from trainer.evaluate import build_evaluator
from trainer.layout import check_vocab, validate_run
from trainer.logging_utils import setup_logging
from trainer.model_build import StageLoader

log = logging.getLogger("longctx")


class RunSetup:
    config_file = "config.yaml"
    """Where rank 0 records the resolved config, under output_dir."""
    stage_engine: str | None = None
    """The engine whose stage build to use (trainer/engine.py STAGE_BUILDS); None: parallel.engine's."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._start()
        self._validate()  # everything that can reject the run, before any weights or data are loaded
        self._record_config()
        self._build_mesh()

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
            saved = self.out / self.config_file
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
        builder, dtype = stage_build(cfg, self.mesh, self.stage_engine)
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

    def _build_evaluator(self):
        return build_evaluator(self.cfg, self.model, self.tokenizer, self.mesh, self.device, self.out)
