"""`train.py --eval-only`: score model.path or the newest checkpoint in output_dir with the eval settings,
under the run's mesh and CP strategy; no optimizer, no training data, no step."""

from __future__ import annotations

import dataclasses

from trainer.checkpoint import Checkpointer
from trainer.config import Config, config_to_dict
from trainer.evaluate import load_weights_for_eval
from trainer.metrics import MetricsLogger
from trainer.run_setup import RunSetup


class EvalOnlyRun(RunSetup):
    config_file = "eval/config.yaml"  # output_dir/config.yaml stays the training run's own
    stage_engine = "fsdp2"  # sharded as FSDP2 training shards it, whatever engine trained the weights

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.model = self._build_stage()
        self.family.parallelize(self.model, self.mesh, self.dims, self.cfg)  # as Fsdp2Engine does
        self._fill_stage(self.model)
        # Only the engine name of a checkpoint's layout is checked on load; eval reads FSDP2 checkpoints.
        self.checkpointer = Checkpointer(
            self.cfg.checkpoint, self.out, layout={"engine": "fsdp2"}, model_config=self.hf_config
        )
        self.evaluator = self._build_evaluator()

    def run(self) -> dict:
        """Evaluate once; returns the eval.jsonl record."""
        self.step, weights = load_weights_for_eval(self.checkpointer, self.model, self.cfg.model.path)
        logging_cfg = dataclasses.replace(self.cfg.logging, progress=False)
        metrics = MetricsLogger(logging_cfg, self.out, self.rank, self.world, config_to_dict(self.cfg))
        try:
            record = self.evaluator.run(self.step, metrics, weights)
        finally:
            metrics.close()
        self.evaluations = [record]
        return record
