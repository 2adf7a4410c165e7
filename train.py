"""longctx: long-context training with context parallelism.

torchrun --nproc_per_node 4 train.py --config configs/demo.yaml [key=value ...]
                                     [--dry-run | --plan | --preprocess | --eval-only]
"""

from __future__ import annotations

import sys


def run(cfg, flags) -> int:
    if flags.preprocess:
        from trainer.data import preprocess

        preprocess(cfg)
        return 0
    from trainer import distributed, rank_failures
    from trainer.config import ConfigError
    from trainer.errors import USER_ERRORS, one_line
    from trainer.eval_only import EvalOnlyRun
    from trainer.signals import exit_interrupted
    from trainer.trainer import Trainer

    try:
        if flags.eval_only:
            EvalOnlyRun(cfg).run()
        else:
            Trainer(cfg).train()
    except USER_ERRORS as exc:  # bad data, checkpoint, path, non-finite loss: one line on one rank
        return rank_failures.report_failure(f"error: {one_line(exc)}", 1)
    except KeyboardInterrupt:
        exit_interrupted()
    except ConfigError as exc:  # found once the process group exists: this rank's line, exit 2
        distributed.exit_if_peers_wait(f"config error: {exc}", code=2)
        raise  # alone: cli_main prints it and exits 2
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
