"""Where the Triton kernels of this package can run, and the one call that launches them.

* The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
  (``TRITON_INTERPRET=1`` before triton is imported), which some triton / numpy pairs cannot run:
  :func:`check_launchable` says so before a launch instead of the launch's bare error.
* :class:`LaunchHook` is the documented way in for tools that run the host code without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton

from encoder_fusion.kernels.grid_fuse_jit import INTERPRETED


def _version(text: str) -> tuple[int, int]:
    major, minor = [*re.findall(r"\d+", text), "0", "0"][:2]
    return int(major), int(minor)


def interpreter_problem(interpreted: bool, triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run these kernels in this environment, or None: before
    Triton 3.7 it converts one-element arrays to ints in a way numpy 2.4 rejects, so every kernel
    with a loop over a run-time count fails with a bare TypeError."""
    if interpreted and _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 4):
        return (
            f"TRITON_INTERPRET=1 with triton {triton_version} and numpy {numpy_version}: Triton's "
            "interpreter before 3.7 fails under numpy >= 2.4; install numpy<2.4 or triton>=3.7 "
            "(compiled kernels on a GPU are not affected)"
        )
    return None


# numpy's version from its metadata: the kernels import only torch and triton.
_INTERPRETER_PROBLEM = interpreter_problem(
    INTERPRETED, triton.__version__, importlib.metadata.version("numpy")
)


@dataclass(frozen=True)
class LaunchHook:
    """A stand-in for the GPU, for tools that run the host side of calls without one
    (``encoder_fusion.benchmarks.kernel.registers`` compiles each launch for a GPU that is not there,
    ``encoder_fusion.benchmarks.kernel.host`` times the host side alone). Inside :func:`hooked_launches`,
    every kernel launch calls ``launch(kernel, grid, args, kwargs)`` instead of running, tensors on any
    device pass the device check (nothing runs on them), and the backward grids are sized for
    ``sm_count`` multiprocessors.
    """

    launch: Callable[[Any, tuple[int, ...], tuple, dict], object]
    sm_count: int


_HOOK: LaunchHook | None = None


@contextlib.contextmanager
def hooked_launches(hook: LaunchHook) -> Iterator[None]:
    """Route every launch through ``hook`` (see :class:`LaunchHook`) while inside."""
    global _HOOK
    previous, _HOOK = _HOOK, hook
    try:
        yield
    finally:
        _HOOK = previous


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, or the installed hook's ``launch`` instead."""
    if _HOOK is None:
        kernel[grid](*args, **kwargs)
    else:
        _HOOK.launch(kernel, grid, args, kwargs)


def check_launchable(device: torch.device) -> None:
    """Raise, before any launch, where the kernels cannot run (instead of the error a launch gives).

    Raises:
        ValueError: CPU tensors without the Triton interpreter.
        RuntimeError: the interpreter cannot run here (:func:`interpreter_problem`).
    """
    if _HOOK is not None:
        return
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"grid_fuse (triton) sources are on {device}; the Triton kernel needs CUDA tensors, "
            "or TRITON_INTERPRET=1 set before triton is imported to run it on the CPU"
        )
    if _INTERPRETER_PROBLEM is not None:
        raise RuntimeError(f"grid_fuse (triton): {_INTERPRETER_PROBLEM}")


_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device) -> int | None:
    """Multiprocessors of a CUDA device (cached) or of the GPU a hook stands in for; None for the
    CPU interpreter."""
    if _HOOK is not None:
        return _HOOK.sm_count
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]
