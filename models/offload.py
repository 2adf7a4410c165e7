"""Activation offload: tensors saved for backward wait in pinned host memory instead of on the GPU.

Unlike torch's `save_on_cpu`, the device-to-host copy runs on a side stream, so the forward does not stall
on it: the compute stream only orders the copy after the tensor is produced, and the allocator is told the
side stream still reads the tensor (`record_stream`), so its memory is reused only once the copy is done.
In backward the host-to-device copy is issued on the compute stream (pinned memory: asynchronous for the
host) after waiting for the offload copy's event.

Parameters and small tensors stay where they are: moving weights (which FSDP regathers anyway) or
kilobyte-sized tensors costs more than it saves. CPU tensors are untouched, so this is a no-op off-GPU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

MIN_BYTES = 1 << 20


class HostOffload(saved_tensors_hooks):
    """Context manager: saved activations of the enclosed forward are offloaded to pinned host memory."""

    def __init__(self, min_bytes: int = MIN_BYTES):
        self.min_bytes = min_bytes
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        super().__init__(self._pack, self._unpack)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, t: torch.Tensor):
        if not t.is_cuda or isinstance(t, nn.Parameter) or t.numel() * t.element_size() < self.min_bytes:
            return t
        side = self._side_stream(t.device)
        side.wait_stream(torch.cuda.current_stream(t.device))
        host = torch.empty(t.size(), dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(side):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        t.record_stream(side)
        return t.device, host, done

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, done = packed
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True)
