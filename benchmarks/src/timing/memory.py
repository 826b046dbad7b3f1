"""Peak memory of a call: on a GPU ``torch.cuda.max_memory_allocated``; on the CPU the process's
resident set size sampled with psutil every millisecond (``peak_mb``, the whole process including every
loaded model) and its rise over the level before the calls (``delta_mb``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil
import torch
from torch import nn

from encoder_fusion.benchmarks.reports.records import MemoryRecord

RSS_INTERVAL_S = 0.001


def tensor_megabytes(module: nn.Module) -> float:
    """Megabytes held by ``module``'s parameters and buffers."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


class RssSampler:
    """Samples this process's resident set size in a background thread; ``peak`` in bytes."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = self.start = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(RSS_INTERVAL_S)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def peak_memory(call: Callable[[], object], device: torch.device, calls: int) -> MemoryRecord:
    """Peak memory over ``calls`` calls of ``call`` (see the module docstring for what is measured;
    ``weights_mb`` is left for the caller)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(calls):
            call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return MemoryRecord("cuda max_memory_allocated", peak / 2**20, (peak - before) / 2**20)
    with RssSampler() as sampler:
        for _ in range(calls):
            call()
    return MemoryRecord(
        "cpu process RSS (psutil, sampled every 1 ms)",
        sampler.peak / 2**20,
        (sampler.peak - sampler.start) / 2**20,
    )
