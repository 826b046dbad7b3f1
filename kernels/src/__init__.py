"""Fusion kernels: ``grid_fuse`` (align + LayerNorm + weight + merge in one pass; the LayerNorm is
skipped with ``normalize=False``).

``encoder_fusion.kernels.reference`` holds the PyTorch definition, ``encoder_fusion.kernels.grid_fuse_triton``
the Triton path (on the kernels of ``encoder_fusion.kernels.grid_fuse_jit``, planned by
``encoder_fusion.kernels.grid_fuse_plan``); both take a call's arguments as one
``encoder_fusion.kernels.grid_fuse_args.GridFuseArgs`` and validate it with
``encoder_fusion.kernels.checks``. :func:`grid_fuse` here picks one per call:

* ``FUSION_KERNEL=auto`` (the default): Triton for CUDA tensors of a dtype it supports (fp32, bf16,
  fp16), the reference for everything else (CPU tensors, float64).
* ``FUSION_KERNEL=triton``: always the Triton kernels (on the CPU this needs ``TRITON_INTERPRET=1``
  set before triton is imported).
* ``FUSION_KERNEL=reference``: always the reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from encoder_fusion.kernels import grid_fuse_triton, reference
from encoder_fusion.kernels.checks import EPS_RANGE, FINITE_ENV, NonFiniteError, finite_checks
from encoder_fusion.kernels.grid_fuse_args import GridFuseArgs, grid_fuse_face
from encoder_fusion.kernels.grid_fuse_plan import SUPPORTED_DTYPES

MODES = reference.MODES
KERNEL_ENV = "FUSION_KERNEL"
# Each backend takes the call's arguments as one GridFuseArgs.
BACKENDS: dict[str, Callable[[GridFuseArgs], torch.Tensor]] = {
    "reference": reference.fuse,
    "triton": grid_fuse_triton.fuse,
}
KERNEL_CHOICES = ("auto", *BACKENDS)


def _auto_backend(sources: Sequence[torch.Tensor]) -> str:
    first = sources[0] if isinstance(sources, Sequence) and len(sources) else None
    # Anything malformed goes to the reference; its checks (shared with Triton) name the problem.
    if isinstance(first, torch.Tensor) and first.is_cuda and first.dtype in SUPPORTED_DTYPES:
        return "triton"
    return "reference"


def kernel_choice(devices: Sequence[str | torch.device] = ()) -> str:
    """``FUSION_KERNEL`` (default ``auto``), checked; with ``devices`` (where a run will call the
    kernel), also that ``triton`` can run on each: a CUDA device, or the CPU under the interpreter.

    Raises:
        ValueError: an unknown value, or ``triton`` on a CPU without ``TRITON_INTERPRET=1``.
    """
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV}={choice!r} is unknown; accepted: {', '.join(KERNEL_CHOICES)}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for device in devices:
        if choice == "triton" and torch.device(device).type != "cuda" and not interpreted:
            raise ValueError(
                f"{KERNEL_ENV}=triton runs the Triton kernels, which need a CUDA device or, on the CPU, "
                f"TRITON_INTERPRET=1; this run uses device {str(device)!r}; accepted: {KERNEL_ENV}=auto "
                "or reference, TRITON_INTERPRET=1, or a CUDA device"
            )
    return choice


def select_backend(sources: Sequence[torch.Tensor]) -> str:
    """The backend (a key of :data:`BACKENDS`) that :func:`grid_fuse` uses for these sources.

    Raises:
        ValueError: ``FUSION_KERNEL`` holds a value other than ``auto``, ``triton`` or ``reference``.
    """
    choice = kernel_choice()
    return _auto_backend(sources) if choice == "auto" else choice


@grid_fuse_face
def grid_fuse(args: GridFuseArgs) -> torch.Tensor:
    """Align, LayerNorm (unless ``normalize=False``), weight and merge channels-last grids on the
    backend :func:`select_backend` picks: ``grid_fuse(sources, out_hw, *, groups, layer_weights,
    ln_weight=None, ln_bias=None, mode="bilinear", eps=1e-6, normalize=True)``; arguments, result and
    errors as :func:`encoder_fusion.kernels.reference.grid_fuse`.

    Returns:
        (B, H*W, sum of group widths) in the sources' dtype, differentiable in sources,
        layer_weights, ln_weight and ln_bias.

    Raises:
        ValueError: a bad argument (before any kernel launch) or a bad ``FUSION_KERNEL``.
    """
    return BACKENDS[select_backend(args.sources)](args)


__all__ = [
    "BACKENDS",
    "EPS_RANGE",
    "FINITE_ENV",
    "KERNEL_CHOICES",
    "KERNEL_ENV",
    "MODES",
    "GridFuseArgs",
    "NonFiniteError",
    "finite_checks",
    "grid_fuse",
    "kernel_choice",
    "select_backend",
]
