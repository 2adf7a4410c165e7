"""longctx: long-context training with context parallelism.

torchrun --nproc_per_node 4 train.py --config configs/demo.yaml [key=value ...] [--dry-run | --preprocess]
"""

from __future__ import annotations

import sys


def run(cfg, flags) -> int:
    if flags.preprocess:
        from trainer.data import preprocess

        preprocess(cfg)
        return 0
    from trainer import distributed
    from trainer.trainer import Trainer

    try:
        Trainer(cfg).train()
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    from trainer.cli import cli_main

    sys.exit(cli_main(sys.argv[1:], run))
