"""train.py for test_rank_failures, except that one rank reads another `data.path` - a path that only
that node cannot see. Usage (under torchrun): rank_data_path.py RANK PATH train.py-arguments..."""

import os
import sys

from train import run
from trainer.cli import cli_main

if __name__ == "__main__":
    bad_rank, bad_path, *argv = sys.argv[1:]
    if os.environ.get("RANK") == bad_rank:
        argv.append(f"data.path={bad_path}")
    sys.exit(cli_main(argv, run))
