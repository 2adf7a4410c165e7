"""parallel.compile: compiled decoder layers and loss chunks train like eager ones, and the CP attention (a
compile boundary) does not make the compiler recompile every step."""

from __future__ import annotations

import os
import time

from tests.dist import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(rank, world, tmp):
    from trainer.config import load_config
    from trainer.trainer import Trainer

    out = {}
    for compiled in (False, True):
        cfg = load_config(
            os.path.join(ROOT, "configs/demo.yaml"),
            [
                f"output_dir={tmp}/c{int(compiled)}",
                f"data.cache_dir={tmp}/cache",
                "training.steps=5",
                "training.seq_len=128",
                "training.loss_chunk=48",  # several checkpointed loss chunks (compiled too), a short last one
                "model.config.num_hidden_layers=2",
                "parallel.dp=1",
                "parallel.cp=2",
                f"parallel.compile={str(compiled).lower()}",
                "logging.progress=false",
                "checkpoint.export_hf=false",
            ],
        )
        t = Trainer(cfg)
        t.train()
        out[compiled] = [(h["loss"], h["step_time_s"]) for h in t.history]
    return out


def test_compiled_layers_match_eager_without_recompiling(tmp_path):
    start = time.time()
    out = run_distributed(_run, 2, str(tmp_path), timeout=900)[0]
    eager, compiled = out[False], out[True]
    for (a, _), (b, _) in zip(eager, compiled):
        assert abs(a - b) / a < 1e-5
    # After the first two steps (compiling, possibly once more), steps run at eager-like speed: no
    # per-step recompilation.
    assert max(t for _, t in compiled[2:]) < 10 * max(t for _, t in eager[2:]) + 0.5, (
        compiled,
        time.time() - start,
    )
