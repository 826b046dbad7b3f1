"""The one validation of ``grid_fuse`` arguments, shared by the reference and the Triton path: a bad
argument gets the same ValueError on either path, naming the argument, the value and what is accepted.
Both check the one :class:`~encoder_fusion.kernels.grid_fuse_args.GridFuseArgs` of a call.

* :func:`check_grid_fuse_inputs` checks what the call's signature decides (kinds, shapes, dtypes,
  devices, groups, mode); the Triton path caches its verdict per signature.
* :func:`check_grid_fuse_values` checks the values no signature captures (``eps`` in
  :data:`EPS_RANGE`, finite layer weights and LayerNorm affine parameters); both paths run it on every
  call.
* :func:`check_finite_output` checks, under the switch, that the output is finite, and names the
  source that made it not; both paths run it after computing.

The output is read only under the switch (:func:`finite_checks`, or ``FUSION_CHECK_FINITE=1``; off by
default, on in the benchmark's probes): it is one reduction over the output (its cost is measured by
``python -m encoder_fusion.benchmarks.kernel.finite_cost``), and on an accelerator it makes the call
wait for the device. A failure raises :class:`NonFiniteError`, which says which source, so that the
fused encoder can name the encoder and layer.

What only the Triton kernels need on top (their dtypes, channel limit, a device they can run on) is
checked by :mod:`encoder_fusion.kernels.grid_fuse_plan` and :mod:`encoder_fusion.kernels.launch`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from collections.abc import Iterator, Sequence

import torch

from encoder_fusion.kernels.grid_fuse_args import GridFuseArgs

MODES = ("bilinear", "nearest", "area")
# LayerNorm's eps: below 1e-12 a constant token divides by almost nothing; above 1 it flattens
# every token (the usual values are 1e-6 and 1e-5)
EPS_RANGE = (1e-12, 1.0)
FINITE_ENV = "FUSION_CHECK_FINITE"
_FINITE_CHECKS = [os.environ.get(FINITE_ENV) == "1"]


class NonFiniteError(ValueError):
    """A ``grid_fuse`` source holding NaN or Inf (``source`` is its index), or, with ``in_output``, an
    output slot that is NaN or Inf although every source is finite (``source``: the slot's first)."""

    def __init__(self, message: str, source: int, in_output: bool = False) -> None:
        super().__init__(message)
        self.source, self.in_output = source, in_output


def _has_values(value: object) -> bool:
    """A floating-point tensor with data (not on the meta device)."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type != "meta"


def finite_checks_enabled() -> bool:
    """Whether ``grid_fuse`` checks its output for NaN and Inf (see the module docstring)."""
    return _FINITE_CHECKS[0]


@contextlib.contextmanager
def finite_checks(enabled: bool = True) -> Iterator[None]:
    """While open, ``grid_fuse`` checks (or, with ``enabled=False``, does not check) that its output
    is finite, naming the source that made it not (:func:`check_finite_output`)."""
    before, _FINITE_CHECKS[0] = _FINITE_CHECKS[0], bool(enabled)
    try:
        yield
    finally:
        _FINITE_CHECKS[0] = before


def is_sequence(value: object) -> bool:
    """Whether ``value`` can hold one entry per source: a list, tuple or other sequence, not a string."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_sources(sources: Sequence[torch.Tensor]) -> None:
    if not is_sequence(sources) or len(sources) == 0:
        got = tuple(sources.shape) if isinstance(sources, torch.Tensor) else repr(sources)
        raise ValueError(f"grid_fuse sources must be a non-empty list of (B, h, w, C) tensors, got {got}")
    for i, x in enumerate(sources):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"grid_fuse sources[{i}] must be a 4-D (B, h, w, C) tensor, got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"grid_fuse sources[{i}] must be floating point, got {x.dtype}")
        if min(x.shape) == 0:
            raise ValueError(f"grid_fuse sources[{i}] has an empty dimension: {tuple(x.shape)}")
        if x.is_meta:
            raise ValueError(
                f"grid_fuse sources[{i}] is on the meta device, which holds no values; "
                "give tensors on a device with data (cpu, cuda)"
            )
    first = sources[0]
    for i, x in enumerate(sources):
        if x.shape[0] != first.shape[0]:
            raise ValueError(
                f"grid_fuse sources[{i}] has batch size {x.shape[0]} but sources[0] has {first.shape[0]}; "
                "all sources must share the batch size"
            )
        if x.dtype != first.dtype or x.device != first.device:
            raise ValueError(
                f"grid_fuse sources[{i}] is {x.dtype} on {x.device} but sources[0] is "
                f"{first.dtype} on {first.device}; all sources must share dtype and device"
            )


def _check_groups(groups: Sequence[int], sources: Sequence[torch.Tensor]) -> list[int]:
    """The width of each group, in group order."""
    count = len(sources)
    if not is_sequence(groups) or len(groups) != count or not all(_is_int(g) for g in groups):
        shown = list(groups) if is_sequence(groups) else groups
        raise ValueError(f"grid_fuse groups must hold one int per source ({count}), got {shown!r}")
    if sorted(set(groups)) != list(range(len(set(groups)))):
        raise ValueError(
            f"grid_fuse groups {list(groups)} must number the output slots 0..G-1 with none skipped"
        )
    widths: dict[int, int] = {}
    for i, (g, x) in enumerate(zip(groups, sources)):
        if widths.setdefault(g, x.shape[-1]) != x.shape[-1]:
            raise ValueError(
                f"grid_fuse sources of group {g} differ in width: sources[{i}] has {x.shape[-1]} channels, "
                f"an earlier source of that group has {widths[g]}; one group shares one width"
            )
    return [widths[g] for g in range(len(widths))]


def _check_on_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"grid_fuse {name} must be floating point, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(
            f"grid_fuse {name} is on {tensor.device} but the sources are on {device}; "
            "all tensors must share one device"
        )


def _check_layer_weights(
    layer_weights: torch.Tensor | Sequence[float], sources: Sequence[torch.Tensor]
) -> None:
    count = len(sources)
    if isinstance(layer_weights, torch.Tensor):
        if layer_weights.ndim != 1:
            raise ValueError(f"grid_fuse layer_weights must be 1-D, got shape {tuple(layer_weights.shape)}")
        weight_count = layer_weights.numel()
    elif is_sequence(layer_weights) and all(_is_number(v) for v in layer_weights):
        weight_count = len(layer_weights)
    else:
        shown = list(layer_weights) if is_sequence(layer_weights) else layer_weights
        raise ValueError(f"grid_fuse layer_weights must be a 1-D tensor or a list of numbers, got {shown!r}")
    if weight_count != count:
        raise ValueError(
            f"grid_fuse layer_weights has {weight_count} entries but there are {count} sources; "
            "give one weight per source"
        )
    if isinstance(layer_weights, torch.Tensor):
        _check_on_device("layer_weights", layer_weights, sources[0].device)


def _check_affine(
    name: str,
    params: Sequence[torch.Tensor | None] | None,
    sources: Sequence[torch.Tensor],
    normalize: bool,
) -> None:
    if params is None:
        return
    count = len(sources)
    if not is_sequence(params):
        got = tuple(params.shape) if isinstance(params, torch.Tensor) else repr(params)
        raise ValueError(
            f"grid_fuse {name} must be None or a list with one (C,) tensor or None per source, got {got}"
        )
    if not normalize and any(p is not None for p in params):
        raise ValueError(
            f"grid_fuse {name} is given with normalize=False; the affine belongs to the LayerNorm "
            f"that normalize=False skips: pass {name}=None"
        )
    if len(params) != count:
        raise ValueError(f"grid_fuse {name} has {len(params)} entries; give one per source ({count})")
    for i, (p, x) in enumerate(zip(params, sources)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise ValueError(
                f"grid_fuse {name}[{i}] must be a ({x.shape[-1]},) tensor or None, got {type(p).__name__}"
            )
        if tuple(p.shape) != (x.shape[-1],):
            raise ValueError(
                f"grid_fuse {name}[{i}] has shape {tuple(p.shape)}; sources[{i}] needs ({x.shape[-1]},)"
            )
        _check_on_device(f"{name}[{i}]", p, x.device)


def check_grid_fuse_inputs(args: GridFuseArgs) -> list[int]:
    """Validate the signature of a ``grid_fuse`` call; return the channel width of each group, in
    group order. Its verdict depends only on what the Triton path's plan cache keys a call by.

    Raises:
        ValueError: naming the argument, the value and what is accepted.
    """
    sources, out_hw, mode, normalize = args.sources, args.out_hw, args.mode, args.normalize
    if mode not in MODES:
        raise ValueError(f"grid_fuse mode={mode!r} is unknown; accepted: {', '.join(MODES)}")
    if not isinstance(normalize, bool):
        raise ValueError(f"grid_fuse normalize must be True or False, got {normalize!r}")
    _check_sources(sources)
    if not is_sequence(out_hw) or len(out_hw) != 2 or not all(_is_int(s) and s > 0 for s in out_hw):
        raise ValueError(f"grid_fuse out_hw must be a pair of positive ints (H, W), got {out_hw!r}")
    widths = _check_groups(args.groups, sources)
    _check_layer_weights(args.layer_weights, sources)
    _check_affine("ln_weight", args.ln_weight, sources, normalize)
    _check_affine("ln_bias", args.ln_bias, sources, normalize)
    return widths


def check_finite_output(args: GridFuseArgs, out: torch.Tensor) -> None:
    """Under :func:`finite_checks`, the output of a call is finite, else the source that poisoned it
    is named. One reduction over the output decides (NaN or Inf anywhere makes its sum non-finite);
    the sources are read only when it fails.

    Raises:
        NonFiniteError: the first source holding NaN or Inf, else the first output slot that is
            non-finite although every source is finite (a value beyond the dtype's range).
    """
    if not finite_checks_enabled() or torch.compiler.is_compiling() or not _has_values(out):
        return
    with torch.no_grad():
        if bool(torch.isfinite(out.sum(dtype=torch.promote_types(out.dtype, torch.float32)))):
            return
        for i, source in enumerate(args.sources):
            if not bool(torch.isfinite(source).all()):
                raise NonFiniteError(f"grid_fuse sources[{i}] holds NaN or Inf; accepted: finite sources", i)
        finite = torch.isfinite(out).flatten(0, -2).all(dim=0)  # per output channel
    if bool(finite.all()):
        return  # only the sum overflowed
    first, groups = 0, list(args.groups)
    for slot in range(max(groups) + 1):
        members = [i for i, g in enumerate(groups) if g == slot]
        width = args.sources[members[0]].shape[-1]
        if not bool(finite[first : first + width].all()):
            raise NonFiniteError(
                f"grid_fuse output slot {slot} (sources {members}) is NaN or Inf although every source is "
                f"finite: its values went beyond {out.dtype}'s range (eps={args.eps:g}); accepted: sources "
                "whose LayerNorm and weighted sum stay in range (a wider dtype)",
                members[0],
                in_output=True,
            )
        first += width


def check_grid_fuse_values(args: GridFuseArgs) -> None:
    """Validate the values of a call that :func:`check_grid_fuse_inputs` accepted: ``eps``, the
    layer weights and the affine parameters, which would otherwise turn the output into NaN.

    The values of a layer-weight tensor are checked only in host memory and outside tracing: on an
    accelerator reading them would make every call wait for the device, and ``torch.compile``
    cannot put a check of values into a graph.

    Raises:
        ValueError: naming the argument, the value and what is accepted.
    """
    eps, layer_weights = args.eps, args.layer_weights
    low, high = EPS_RANGE
    if not _is_number(eps) or not low <= eps <= high:
        raise ValueError(f"grid_fuse eps must be a finite number in [{low:g}, {high:g}], got {eps!r}")
    if torch.compiler.is_compiling():
        return
    for name, params in (("ln_weight", args.ln_weight), ("ln_bias", args.ln_bias)):
        for i, param in enumerate(params if params is not None and is_sequence(params) else ()):
            # (C,) vectors: one reduction each, skipped on an accelerator (as the layer weights are)
            # unless the finite checks are on, which wait for the device anyway
            if not isinstance(param, torch.Tensor) or not _has_values(param):
                continue
            if param.device.type == "cpu" or finite_checks_enabled():
                if bool(torch.isfinite(param).all()):
                    continue
                raise ValueError(
                    f"grid_fuse {name}[{i}] holds NaN or Inf; accepted: finite LayerNorm parameters"
                )
    if isinstance(layer_weights, torch.Tensor):
        if layer_weights.device.type != "cpu":
            return
        layer_weights = layer_weights.tolist()  # a few numbers: cheaper to read than a reduction
    index = next((i for i, v in enumerate(layer_weights) if not math.isfinite(v)), None)
    if index is not None:
        raise ValueError(
            f"grid_fuse layer_weights[{index}] is {layer_weights[index]}; "
            "every layer weight must be a finite number"
        )
