"""Helper for test_launch: rank 1 fails while rank 0 waits in a collective (run under torchrun)."""

import datetime
import os
import sys

import torch
import torch.distributed as dist

from trainer import distributed

if __name__ == "__main__":
    backend = sys.argv[1] if len(sys.argv) > 1 else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    try:
        if dist.get_rank() == 1:
            raise RuntimeError("injected failure on rank 1")
        dist.all_reduce(torch.ones(1, device=device))  # rank 0 would wait here until the timeout
    except Exception:
        distributed.exit_if_peers_wait()
        raise
    finally:
        distributed.cleanup()
