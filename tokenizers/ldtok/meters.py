"""Throughput and peak-memory measurements, shared by training and the benchmark."""

from __future__ import annotations

import resource
import sys
import time

import torch


class ThroughputMeter:
    """Images per second over the timed sections only (checkpointing and validation are not counted).

    `start()` before a step, `stop(num_images)` after it. The first `warmup` sections are not counted: they include
    one-time costs (allocator growth, cuDNN autotuning, k-means initialization).
    """

    def __init__(self, *, warmup: int = 1):
        self.warmup = warmup
        self.sections = 0
        self.images = 0
        self.seconds = 0.0
        self._t0 = None

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def stop(self, num_images: int) -> None:
        assert self._t0 is not None, "ThroughputMeter.stop() without start()"
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._t0
        self._t0 = None
        self.sections += 1
        if self.sections > self.warmup:
            self.images += num_images
            self.seconds += elapsed

    def rate(self) -> float:
        """Images per second so far (0.0 before any counted section)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


def peak_memory_mib(device: torch.device | str) -> float:
    """Peak memory of this process in MiB: CUDA allocator peak on a GPU, peak resident set size on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
