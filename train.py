"""longctx: long-context training with context parallelism.

torchrun --nproc_per_node 4 train.py --config configs/demo.yaml [key=value ...]
                                     [--dry-run | --plan | --preprocess]
"""

from __future__ import annotations

import sys


def run(cfg, flags) -> int:
    if flags.preprocess:
        from trainer.data import preprocess

        preprocess(cfg)
        return 0
    from trainer import distributed, rank_failures
    from trainer.errors import USER_ERRORS, one_line
    from trainer.trainer import Trainer

    try:
        Trainer(cfg).train()
    except USER_ERRORS as exc:  # bad data, checkpoint, path, non-finite loss: one line on one rank
        return rank_failures.report_failure(f"error: {one_line(exc)}", 1)
    except Exception:
        rank_failures.exit_if_a_peer_failed()  # its report is the one line; this is the consequence
        distributed.exit_if_peers_wait()
        raise
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    from trainer.cli import cli_main

    sys.exit(cli_main(sys.argv[1:], run))
