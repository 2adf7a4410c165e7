"""Drops the log records torchao's import writes to stderr that tell a longctx user nothing.

transformers imports torchao whenever it is installed (modeling_utils loads its torchao quantizer), so with
`.[fp8]` installed every longctx process imports torchao, whether or not `training.fp8` is on - and a
command's stderr must hold only its own lines (one `config error:` line for bad input). With torchao 0.18
that import logs two kinds of warnings that are noise here; nothing else is filtered:

- torchao's `Failed to load .../torchao/_C_*.so`, on a CPU build of torch only: those are torchao's CUDA
  kernels (they link libc10_cuda, which a CPU build lacks), and FP8 training uses none of them. On a CUDA
  build the record stays: there it means a torch/torchao mismatch worth seeing.
- torch's `<enum ...> is an Enum subclass and is now natively supported by torch.compile`, for torchao's
  own enums only: torchao registers its enums as pytree constants, which torch 2.13 deprecates.

Installed by the `models`, `trainer` and `parallel` packages on import, before anything imports
transformers; installing twice adds nothing.
"""

from __future__ import annotations

import enum
import logging
import re

_MISSING_CUDA_KERNELS = re.compile(r"Failed to load \S*torchao[/\\]_C\w*\.\S*:")


def _torchao_enum(value: object) -> bool:
    return (
        isinstance(value, type)
        and issubclass(value, enum.Enum)
        and value.__module__.split(".")[0] == "torchao"
    )


class _DropTorchaoImportNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "torchao":
            import torch

            cpu_build = torch.version.cuda is None and getattr(torch.version, "hip", None) is None
            return not (cpu_build and _MISSING_CUDA_KERNELS.match(record.getMessage()))
        if record.name == "torch.utils._pytree" and record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            return not (_torchao_enum(args[0]) and "is an Enum subclass" in str(record.msg))
        return True


_FILTER = _DropTorchaoImportNoise()


def install() -> None:
    """Attach the filter to the two loggers that write these records."""
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
