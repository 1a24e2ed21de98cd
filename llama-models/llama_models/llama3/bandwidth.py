"""How fast this machine's memory can be read: the physical limit of a decode step.

A decode step reads every weight once, so no kernel can decode faster than memory bandwidth / bytes
per token. The bandwidth is measured by the simplest stream PyTorch runs, a reduction over a tensor
far larger than any CPU cache: it reads each byte once and does almost no arithmetic, so it is
limited by memory alone. (A matrix-vector product is not a measure of the memory: its kernel may be
the slower part, and then another program beats the "limit".) The fastest of a few reductions and
repetitions counts, since a slow kernel or another process only ever makes a reading lower.
"""

import time

import torch

from .devices import synchronize

GIB = 2**30
REPEATS = 5  # of each reduction


def memory_read_bandwidth(size_bytes: int = GIB, device: torch.device | str = "cpu") -> float:
    """Bytes per second, the best of float32 sum, float32 amax and int32 amax over `size_bytes` of
    the device's memory."""
    device = torch.device(device)
    buffer = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)  # writes every page first
    reductions = (buffer.sum, buffer.amax, buffer.view(torch.int32).amax)
    best = min(_fastest(reduction, device) for reduction in reductions)
    return buffer.nbytes / best


def _fastest(function, device: torch.device) -> float:
    times = []
    for _ in range(REPEATS):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)
