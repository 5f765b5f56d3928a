"""CUDA timing shared by the GPU benchmarks (scan_gpu.py, ssd_gpu.py): run as scripts from the repository
root (``python benchmarks/scan_gpu.py``), which puts this folder on ``sys.path``."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cuda_time_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median over `repeats` of one call's time in ms, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(repeats: int) -> float:
    """Bytes read + written per second of a 1 GiB device-to-device clone."""
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    ms = cuda_time_ms(lambda: x.clone(), repeats, warmup=3)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)
