"""Timing calls side by side: a fixed thread count, one timer for CPU and GPU, autocast binding, and
the round robin that takes every call's repeats in turn, so drift or a noisy neighbour hits every
pipeline alike."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol, TypeVar

import torch

T = TypeVar("T")


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    """Set torch's CPU thread count for the block, then restore it."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Timer:
    """Times one call: CUDA events on a GPU (synchronised), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        """Run ``fn`` once; its duration in milliseconds."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def compile_wrapper(enabled: bool, backend: str) -> Callable[[Callable], Callable]:
    """``torch.compile`` with ``backend`` and static shapes when ``enabled``, else the identity."""
    if not enabled:
        return lambda fn: fn
    return lambda fn: torch.compile(fn, backend=backend, dynamic=False)


def random_images(batch: int, size: int, seed: int, device: torch.device) -> torch.Tensor:
    """A fixed batch of random uint8 images (B, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=generator, dtype=torch.uint8).to(device)


class Binder(Protocol):
    """``bind(fn, *args)`` -> a no-argument call of ``fn(*args)``, returning what ``fn`` returns."""

    def __call__(self, fn: Callable[..., T], /, *args: object) -> Callable[[], T]: ...


def autocast_binder(device: torch.device, dtype: torch.dtype | None) -> Binder:
    """``bind(fn, *args)`` -> a no-argument call of ``fn(*args)`` under autocast to ``dtype``
    (plain when ``dtype`` is None)."""

    def bind(fn: Callable[..., T], /, *args: object) -> Callable[[], T]:
        def call() -> T:
            if dtype is None:
                return fn(*args)
            with torch.autocast(device.type, dtype=dtype):
                return fn(*args)

        return call

    return bind


def round_robin(
    timer: Callable[[Callable[[], object]], float],
    calls: Mapping[tuple[str, str], Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    enough: Callable[[dict[tuple[str, str], list[float]]], bool] | None = None,
    max_repeats: int | None = None,
) -> dict[tuple[str, str], list[float]]:
    """Samples of every call (each stage and the end-to-end forward of every pipeline): ``warmup``
    untimed rounds, then ``repeats`` timed ones, each round calling all of them in turn; with
    ``enough``, more rounds (half of ``repeats`` at a time) until ``enough(samples)`` holds or
    ``max_repeats`` rounds are taken."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in calls}

    def rounds(count: int) -> None:
        for _ in range(count):
            for name, call in calls.items():
                samples[name].append(timer(call))

    rounds(repeats)
    taken, cap = repeats, max(repeats, max_repeats or repeats)
    while enough is not None and taken < cap and not enough(samples):
        step = min(max(1, repeats // 2), cap - taken)
        rounds(step)
        taken += step
    return samples
