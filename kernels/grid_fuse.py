"""``grid_fuse`` in Triton: resample, LayerNorm, weight and merge token grids in one pass.

The four layers, from the bottom up:

* ``_grid_fuse_forward_kernel``: one program per output token and group. For every source of the
  group it computes the resample taps of that token in registers, gathers the C channels of the
  source tokens it needs, takes the LayerNorm statistics in fp32, applies the affine and the layer
  weight and accumulates; the group's sum is stored straight into the group's channel slice of the
  ``(B, H*W, sum C)`` output. Nothing else touches global memory, except the per-token mean and
  rstd (two fp32 numbers per source and token) when a backward pass will need them.
* ``_grid_fuse_backward_rows_kernel``: per output token, the gradient of the resampled token
  (``dr``) of every source in the group, plus fp32 partial sums for the parameter gradients, one
  row of partials per program, reduced afterwards with ``torch.sum``.
* ``_grid_fuse_backward_scatter_kernel``: turns ``dr`` into the gradient of a resampled source by
  gathering: one program per source token walks the few output tokens whose taps read it. A source
  whose grid already matches the target gets ``dr`` as its gradient directly and skips this pass.
* host functions :func:`grid_fuse_forward` / :func:`grid_fuse_backward` (validation, buffers,
  block sizes), :class:`GridFuseFunction` and the functional :func:`triton_grid_fuse`.

The backward pass uses no atomics: for a given shape and device its result is bit-for-bit
reproducible.

Resampling follows PyTorch's ``F.interpolate`` exactly: ``bilinear`` with ``align_corners=False``
(source index ``scale*(o+0.5)-0.5`` clamped at 0, scale = in/out), ``nearest`` (legacy
``floor(o*scale)`` with a float32 scale), ``area`` (adaptive average pooling windows
``[floor(o*in/out), ceil((o+1)*in/out))``). A grid that already has the target size is copied as is.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.runtime.interpreter import InterpretedFunction

from kernels.reference import check_grid_fuse_inputs

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One token's channels are held in registers; beyond this a row no longer fits one program.
MAX_CHANNELS = 16384
# Kernel-side codes of the resample modes (a constexpr: each mode compiles its own kernel).
BILINEAR = tl.constexpr(0)
NEAREST = tl.constexpr(1)
AREA = tl.constexpr(2)
_MODE_CODES = {"bilinear": BILINEAR.value, "nearest": NEAREST.value, "area": AREA.value}


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _axis_taps(o, n_in, n_out, scale, MODE: tl.constexpr):
    """Taps of output index ``o`` along one axis: (first input index, tap count, weight of the first
    tap, weight of each later tap)."""
    if MODE == BILINEAR:  # align_corners=False, clamped like PyTorch
        src = tl.maximum(scale * (tl.cast(o, tl.float32) + 0.5) - 0.5, 0.0)
        first = tl.minimum(tl.cast(src, tl.int64), n_in - 1)  # src >= 0, so truncation is floor
        lam = src - tl.cast(first, tl.float32)
        # The second tap falls away at the last row (PyTorch adds it to the first) or when lam is 0.
        two = (first < n_in - 1) & (lam != 0.0)
        count = tl.where(two, 2, 1)
        w_first = tl.where(two, 1.0 - lam, 1.0)
        w_rest = lam
    elif MODE == NEAREST:  # PyTorch's legacy floor(o * scale) with a float32 scale
        first = tl.minimum(tl.floor(tl.cast(o, tl.float32) * scale).to(tl.int64), n_in - 1)
        count = tl.full((), 1, tl.int64)
        w_first = tl.full((), 1.0, tl.float32)
        w_rest = tl.full((), 0.0, tl.float32)
    else:  # AREA: adaptive_avg_pool2d windows, integer arithmetic
        first = (o * n_in) // n_out
        count = ((o + 1) * n_in + n_out - 1) // n_out - first
        w_first = 1.0 / tl.cast(count, tl.float32)
        w_rest = w_first
    return first, count, w_first, w_rest


@triton.jit
def _axis_weight(o, i, n_in, n_out, scale, MODE: tl.constexpr):
    """Weight with which output index ``o`` reads input index ``i`` along one axis (0 if it does not)."""
    first, count, w_first, w_rest = _axis_taps(o, n_in, n_out, scale, MODE)
    return tl.where(i == first, w_first, tl.where((i > first) & (i < first + count), w_rest, 0.0))


@triton.jit
def _axis_readers(i, n_in, n_out, MODE: tl.constexpr):
    """A window [lo, hi] of the output indices whose taps may include input index ``i``: exact for
    area, one index wider on each side for the float-scaled modes."""
    if MODE == BILINEAR:  # reads i from outputs whose source index is in [i-1, i+1)
        lo = tl.maximum(tl.maximum((2 * i - 1) * n_out - n_in, 0) // (2 * n_in) - 1, 0)
        hi = ((2 * i + 3) * n_out + n_in - 1) // (2 * n_in)
    elif MODE == NEAREST:  # floor(o * in / out) == i
        lo = tl.maximum((i * n_out) // n_in - 1, 0)
        hi = ((i + 1) * n_out + n_in - 1) // n_in
    else:  # AREA: floor(o * in / out) <= i < ceil((o + 1) * in / out)
        lo = (i * n_out) // n_in
        hi = ((i + 1) * n_out + n_in - 1) // n_in - 1
    return lo, tl.minimum(hi, n_out - 1)


@triton.jit
def _resample_token(src, b, oy, ox, H, W, cols, mask, MODE: tl.constexpr):
    """Channels of output token (oy, ox) of batch item b resampled from grid ``src``, in fp32."""
    y0, ny, wy0, wy1 = _axis_taps(oy, src.height, H, src.scale_h, MODE)
    x0, nx, wx0, wx1 = _axis_taps(ox, src.width, W, src.scale_w, MODE)
    base = src.x + b * src.stride_b
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for ty in range(0, ny):
        wy = tl.where(ty == 0, wy0, wy1)
        row = base + (y0 + ty) * src.stride_y
        for tx in range(0, nx):
            wx = tl.where(tx == 0, wx0, wx1)
            v = tl.load(row + (x0 + tx) * src.stride_x + cols, mask=mask, other=0.0)
            acc += (wy * wx) * v.to(tl.float32)
    return acc


@triton.jit
def _grid_fuse_forward_kernel(
    Y_ptr,  # output, shape (B*H*W, y_cols); this group's channels start at column y_col
    y_cols,
    y_col,
    sources,  # tuple of L _Grid: source x (B, h, w, C), channel stride 1; LN params (C,);
    # layer weight (1,) fp32; mean and rstd rows (B*H*W,) fp32
    H,
    W,
    C,
    eps,
    MODE: tl.constexpr,
    STORE_STATS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // (H * W)
    oy = (token % (H * W)) // W
    ox = token % W
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C

    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in tl.static_range(len(sources)):
        src = sources[i]
        r = _resample_token(src, b, oy, ox, H, W, cols, mask, MODE)
        mean = tl.sum(r, axis=0) / C
        centred = tl.where(mask, r - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=0) / C + eps)
        if STORE_STATS:
            tl.store(src.mean + token, mean)
            tl.store(src.rstd + token, rstd)
        y = centred * rstd * tl.load(src.ln_weight + cols, mask=mask, other=0.0).to(tl.float32)
        y += tl.load(src.ln_bias + cols, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(src.layer_weight) * y
    tl.store(Y_ptr + token * y_cols + y_col + cols, acc.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grid_fuse_backward_rows_kernel(
    DY_ptr,  # grad of the output, shape (B*H*W, y_cols); this group's channels start at y_col
    y_cols,
    y_col,
    sources,  # tuple of L _Grid, as in the forward (mean and rstd rows are read here)
    DR_ptrs,  # tuple of L pointers, each (B*H*W, C): grad of the resampled token of each source
    P_ptr,  # (n_programs, L, C) fp32: partial sums over tokens of dy * xhat, per source
    Q_ptr,  # (n_programs, C) fp32: partial sums over tokens of dy
    N,
    H,
    W,
    C,
    rows_per_program,
    MODE: tl.constexpr,
    NEED_SOURCES: tl.constexpr,
    NEED_PARAMS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, N)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    lanes = tl.arange(0, BLOCK_L)
    # One accumulator row per source: static loops cannot carry a list of separate tensors.
    p_acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    q_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)

    for token in range(start, end):
        b = token // (H * W)
        oy = (token % (H * W)) // W
        ox = token % W
        dy = tl.load(DY_ptr + token * y_cols + y_col + cols, mask=mask, other=0.0).to(tl.float32)
        q_acc += dy
        for i in tl.static_range(len(sources)):
            src = sources[i]
            r = _resample_token(src, b, oy, ox, H, W, cols, mask, MODE)
            rstd = tl.load(src.rstd + token)
            xhat = tl.where(mask, (r - tl.load(src.mean + token)) * rstd, 0.0)
            if NEED_PARAMS:
                p_acc += tl.where(lanes[:, None] == i, (dy * xhat)[None, :], 0.0)
            if NEED_SOURCES:
                g = dy * tl.load(src.layer_weight)
                g = g * tl.load(src.ln_weight + cols, mask=mask, other=0.0).to(tl.float32)
                c1 = tl.sum(g * xhat, axis=0) / C
                c2 = tl.sum(g, axis=0) / C
                dr = (g - (xhat * c1 + c2)) * rstd
                dr_ptr = DR_ptrs[i]
                tl.store(dr_ptr + token * C + cols, dr.to(dr_ptr.dtype.element_ty), mask=mask)

    if NEED_PARAMS:
        p_ptrs = P_ptr + (pid * len(sources) + lanes[:, None]) * C + cols[None, :]
        tl.store(p_ptrs, p_acc, mask=(lanes[:, None] < len(sources)) & mask[None, :])
        tl.store(Q_ptr + pid * C + cols, q_acc, mask=mask)


@triton.jit
def _grid_fuse_backward_scatter_kernel(
    DX_ptr,  # grad of the source, shape (B, h, w, C), contiguous
    DR_ptr,  # grad of the resampled tokens, shape (B, H*W, C) fp32
    h,
    w,
    H,
    W,
    C,
    scale_h,
    scale_w,
    MODE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // (h * w)
    iy = (token % (h * w)) // w
    ix = token % w
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    y_lo, y_hi = _axis_readers(iy, h, H, MODE)
    x_lo, x_hi = _axis_readers(ix, w, W, MODE)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    # The exact weights are 0 for window entries that do not read this token; they skip the load.
    for oy in range(y_lo, y_hi + 1):
        wy = _axis_weight(oy, iy, h, H, scale_h, MODE)
        for ox in range(x_lo, x_hi + 1):
            weight = wy * _axis_weight(ox, ix, w, W, scale_w, MODE)
            if weight != 0.0:
                g_ptrs = DR_ptr + ((b * H + oy) * W + ox) * C + cols
                acc += weight * tl.load(g_ptrs, mask=mask, other=0.0)
    tl.store(DX_ptr + token * C + cols, acc.to(DX_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


# Triton decides at decoration time whether kernels are compiled or interpreted (TRITON_INTERPRET).
_INTERPRETED = isinstance(_grid_fuse_forward_kernel, InterpretedFunction)


class _Grid(NamedTuple):
    """One source as the kernels see it (a tuple argument of tensors and numbers, never None)."""

    x: torch.Tensor
    stride_b: int
    stride_y: int
    stride_x: int
    height: int
    width: int
    scale_h: float
    scale_w: float
    layer_weight: torch.Tensor
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor


def _new_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels write is allocated here (tests poison it to catch unwritten elements)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def _pytorch_scale(n_in: int, n_out: int) -> float:
    """``n_in / n_out`` rounded to float32, as PyTorch's resample kernels compute their scale."""
    return torch.tensor(n_in / n_out, dtype=torch.float32).item()


def _launch_settings(width: int) -> tuple[int, int]:
    """BLOCK_C (the width rounded up to a power of two) and the number of warps for it."""
    block = triton.next_power_of_2(width)
    num_warps = 16 if block >= 8192 else 8 if block >= 2048 else 4 if block >= 256 else 2
    return block, num_warps


def _check_kernel_inputs(
    sources: Sequence[torch.Tensor],
    out_hw: Sequence[int],
    groups: Sequence[int],
    layer_weights: torch.Tensor | Sequence[float],
    ln_weight: Sequence[torch.Tensor | None] | None,
    ln_bias: Sequence[torch.Tensor | None] | None,
    mode: str,
) -> list[int]:
    """The reference checks plus what the kernel itself needs; returns the width of each group.

    Raises:
        ValueError: naming the argument, the value and what is accepted.
    """
    widths = check_grid_fuse_inputs(sources, out_hw, groups, layer_weights, ln_weight, ln_bias, mode)
    first = sources[0]
    if first.dtype not in SUPPORTED_DTYPES:
        accepted = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise ValueError(
            f"grid_fuse (triton) sources have dtype {first.dtype}; accepted: {accepted} "
            "(use the reference for others)"
        )
    if first.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"grid_fuse (triton) sources are on {first.device}; the Triton kernel needs CUDA tensors, "
            "or TRITON_INTERPRET=1 set before triton is imported to run it on the CPU"
        )
    for g, width in enumerate(widths):
        if width > MAX_CHANNELS:
            raise ValueError(
                f"grid_fuse (triton) group {g} has {width} channels; at most {MAX_CHANNELS} are supported"
            )
    if not isinstance(layer_weights, torch.Tensor):
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in layer_weights):
            raise ValueError(
                "grid_fuse layer_weights must be a 1-D tensor or a list of numbers, "
                f"got {list(layer_weights)!r}"
            )
    else:
        if not layer_weights.is_floating_point():
            raise ValueError(f"grid_fuse layer_weights must be floating point, got {layer_weights.dtype}")
        if layer_weights.device != first.device:
            raise ValueError(
                f"grid_fuse layer_weights is on {layer_weights.device} but the sources are on "
                f"{first.device}; all tensors must share one device"
            )
    for name, params in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        for i, p in enumerate(params or ()):
            if p is None:
                continue
            if not p.is_floating_point():
                raise ValueError(f"grid_fuse {name}[{i}] must be floating point, got {p.dtype}")
            if p.device != first.device:
                raise ValueError(
                    f"grid_fuse {name}[{i}] is on {p.device} but the sources are on {first.device}; "
                    "all tensors must share one device"
                )
    return widths


def _layer_weight_table(layer_weights: torch.Tensor | Sequence[float], device: torch.device) -> torch.Tensor:
    """The layer weights as a contiguous fp32 (S,) tensor on the sources' device."""
    if isinstance(layer_weights, torch.Tensor):
        return layer_weights.detach().to(device=device, dtype=torch.float32).contiguous()
    return torch.tensor([float(v) for v in layer_weights], dtype=torch.float32, device=device)


def _channels_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/row/column strides but need channel stride 1; copy otherwise."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _param(params: Sequence[torch.Tensor | None] | None, i: int) -> torch.Tensor | None:
    p = None if params is None else params[i]
    return None if p is None else p.detach().contiguous()


@dataclass(frozen=True)
class _Group:
    """One output slot: its sources (indices into ``sources``), width and first output column."""

    members: tuple[int, ...]
    width: int
    column: int


def _plan_groups(groups: Sequence[int], widths: Sequence[int]) -> list[_Group]:
    columns = [0, *itertools.accumulate(widths)]
    return [
        _Group(tuple(i for i, gi in enumerate(groups) if gi == g), width, columns[g])
        for g, width in enumerate(widths)
    ]


def _grids(
    sources: Sequence[torch.Tensor],
    group: _Group,
    out_hw: Sequence[int],
    weights: torch.Tensor,
    ln_weight: Sequence[torch.Tensor | None] | None,
    ln_bias: Sequence[torch.Tensor | None] | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor | None,
) -> tuple[_Grid, ...]:
    """The kernel-side description of each source of ``group``."""
    return tuple(
        _Grid(
            x=sources[i],
            stride_b=sources[i].stride(0),
            stride_y=sources[i].stride(1),
            stride_x=sources[i].stride(2),
            height=sources[i].shape[1],
            width=sources[i].shape[2],
            scale_h=_pytorch_scale(sources[i].shape[1], out_hw[0]),
            scale_w=_pytorch_scale(sources[i].shape[2], out_hw[1]),
            layer_weight=weights[i],
            ln_weight=_param_or_fill(ln_weight, i, 1.0, sources[i]),
            ln_bias=_param_or_fill(ln_bias, i, 0.0, sources[i]),
            # unread unless the kernel stores or reads statistics (a constexpr decides)
            mean=weights if mean is None else mean[i],
            rstd=weights if rstd is None else rstd[i],
        )
        for i in group.members
    )


def _param_or_fill(
    params: Sequence[torch.Tensor | None] | None, i: int, fill: float, source: torch.Tensor
) -> torch.Tensor:
    """The affine parameter of source i, or the identity (ones / zeros) where it has none.

    Compiled Triton (3.6 at least) cannot specialise a None inside a tuple-of-NamedTuple
    argument, so the kernels always get a tensor; C extra floats per source cost nothing.
    """
    p = _param(params, i)
    if p is not None:
        return p
    return torch.full((source.shape[-1],), fill, dtype=torch.float32, device=source.device)


def _check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < math.inf):
        raise ValueError(f"grid_fuse eps must be a finite number >= 0, got {eps!r}")


def _check_buffer(name: str, tensor: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"grid_fuse {name} must have shape {shape}, got {got}")
    if tensor.dtype != like.dtype or tensor.device != like.device:
        raise ValueError(
            f"grid_fuse {name} is {tensor.dtype} on {tensor.device}; it must be {like.dtype} on {like.device}"
        )
    if not tensor.is_contiguous():
        raise ValueError(f"grid_fuse {name} must be contiguous, got strides {tensor.stride()}")


def grid_fuse_forward(
    sources: Sequence[torch.Tensor],
    out_hw: Sequence[int],
    groups: Sequence[int],
    layer_weights: torch.Tensor | Sequence[float],
    ln_weight: Sequence[torch.Tensor | None] | None = None,
    ln_bias: Sequence[torch.Tensor | None] | None = None,
    mode: str = "bilinear",
    eps: float = 1e-6,
    *,
    out: torch.Tensor | None = None,
    save_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run the forward kernel once per group.

    Args:
        sources, out_hw, groups, layer_weights, ln_weight, ln_bias, mode, eps: as
            :func:`kernels.reference.grid_fuse`; sources may have any batch/row/column strides
            (channels with stride 1 are read in place, others are copied first).
        out: optional contiguous (B, H*W, sum C) buffer of the sources' dtype to write into.
        save_stats: also return the per-token LayerNorm mean and rstd the backward pass needs.

    Returns:
        ``(out, mean, rstd)``: out is (B, H*W, sum C) in the sources' dtype; mean and rstd are
        (S, B*H*W) fp32 tensors (row i for sources[i]), or None without ``save_stats``.

    Raises:
        ValueError: bad arguments (see :func:`kernels.reference.check_grid_fuse_inputs`), a dtype
            other than fp32/bf16/fp16, tensors on different devices, a CPU tensor without the
            Triton interpreter, a group wider than ``MAX_CHANNELS``, or a malformed ``out``.
    """
    widths = _check_kernel_inputs(sources, out_hw, groups, layer_weights, ln_weight, ln_bias, mode)
    _check_eps(eps)
    sources = [_channels_contiguous(x) for x in sources]
    first = sources[0]
    height, width = out_hw
    rows = first.shape[0] * height * width
    out_shape = (first.shape[0], height * width, sum(widths))
    if out is None:
        out = _new_buffer(out_shape, first.dtype, first.device)
    else:
        _check_buffer("out", out, out_shape, first)
    mean = rstd = None
    if save_stats:
        mean = _new_buffer((len(sources), rows), torch.float32, first.device)
        rstd = _new_buffer((len(sources), rows), torch.float32, first.device)
    weights = _layer_weight_table(layer_weights, first.device)
    for group in _plan_groups(groups, widths):
        block, num_warps = _launch_settings(group.width)
        _grid_fuse_forward_kernel[(rows,)](
            out,
            out_shape[-1],
            group.column,
            _grids(sources, group, out_hw, weights, ln_weight, ln_bias, mean, rstd),
            height,
            width,
            group.width,
            float(eps),
            MODE=_MODE_CODES[mode],
            STORE_STATS=save_stats,
            BLOCK_C=block,
            num_warps=num_warps,
        )
    return out, mean, rstd


class GridFuseGrads(NamedTuple):
    """Gradients from :func:`grid_fuse_backward`, one entry per source (None where not asked for)."""

    sources: list[torch.Tensor | None]
    layer_weights: torch.Tensor | None
    ln_weight: list[torch.Tensor | None]
    ln_bias: list[torch.Tensor | None]


def _row_programs(rows: int, device: torch.device) -> int:
    """Programs for the backward row kernel: enough to fill the GPU, few enough that the fp32
    partials (one row per program) stay small next to the data."""
    cap = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(cap, triton.cdiv(rows, 8)))


def grid_fuse_backward(
    grad_out: torch.Tensor,
    sources: Sequence[torch.Tensor],
    out_hw: Sequence[int],
    groups: Sequence[int],
    layer_weights: torch.Tensor | Sequence[float],
    ln_weight: Sequence[torch.Tensor | None] | None,
    ln_bias: Sequence[torch.Tensor | None] | None,
    mode: str,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    need_sources: bool = True,
    need_params: bool = True,
) -> GridFuseGrads:
    """Gradients of ``grid_fuse`` given the gradient of its output; deterministic (no atomics).

    Args:
        grad_out: (B, H*W, sum C), the gradient of the forward output.
        sources, out_hw, groups, layer_weights, ln_weight, ln_bias, mode: as in the forward.
        mean, rstd: the (S, B*H*W) fp32 statistics :func:`grid_fuse_forward` saved.
        need_sources: compute the source gradients.
        need_params: compute the gradients of layer_weights, ln_weight and ln_bias.

    Returns:
        :class:`GridFuseGrads`: source gradients in the sources' dtype and layout (B, h, w, C);
        layer-weight gradient as fp32 (S,); LN gradients in each parameter's dtype, None where the
        parameter is None or the gradient was not asked for.

    Raises:
        ValueError: bad arguments as in :func:`grid_fuse_forward`, or a grad_out, mean or rstd of
            the wrong shape, dtype or device.
    """
    widths = _check_kernel_inputs(sources, out_hw, groups, layer_weights, ln_weight, ln_bias, mode)
    sources = [_channels_contiguous(x) for x in sources]
    first = sources[0]
    height, width = out_hw
    rows = first.shape[0] * height * width
    out_shape = (first.shape[0], height * width, sum(widths))
    if not isinstance(grad_out, torch.Tensor) or tuple(grad_out.shape) != out_shape:
        got = tuple(grad_out.shape) if isinstance(grad_out, torch.Tensor) else type(grad_out).__name__
        raise ValueError(f"grid_fuse grad_out must have shape {out_shape}, got {got}")
    if grad_out.device != first.device:
        raise ValueError(f"grid_fuse grad_out is on {grad_out.device}; the sources are on {first.device}")
    grad_out = grad_out.contiguous()
    stats_like = torch.empty(0, dtype=torch.float32, device=first.device)
    _check_buffer("mean", mean, (len(sources), rows), stats_like)
    _check_buffer("rstd", rstd, (len(sources), rows), stats_like)

    weights = _layer_weight_table(layer_weights, first.device)
    count = len(sources)
    grads = GridFuseGrads([None] * count, None, [None] * count, [None] * count)
    weight_grads: list[torch.Tensor | None] = [None] * count
    for group in _plan_groups(groups, widths):
        block, num_warps = _launch_settings(group.width)
        grad_rows: list[torch.Tensor | None] = [None] * len(group.members)
        if need_sources:
            for k, i in enumerate(group.members):
                x = sources[i]
                if tuple(x.shape[1:3]) == tuple(out_hw):  # identity: dr is the source gradient
                    grads.sources[i] = grad_rows[k] = _new_buffer(x.shape, x.dtype, x.device)
                else:
                    grad_rows[k] = _new_buffer((rows, group.width), torch.float32, x.device)
        programs = _row_programs(rows, first.device)
        rows_per_program = triton.cdiv(rows, programs)
        programs = triton.cdiv(rows, rows_per_program)
        partial_p = partial_q = None
        if need_params:
            partial_p = _new_buffer((programs, len(group.members), group.width), torch.float32, first.device)
            partial_q = _new_buffer((programs, group.width), torch.float32, first.device)
        _grid_fuse_backward_rows_kernel[(programs,)](
            grad_out,
            out_shape[-1],
            group.column,
            _grids(sources, group, out_hw, weights, ln_weight, ln_bias, mean, rstd),
            tuple(grad_rows),
            partial_p,
            partial_q,
            rows,
            height,
            width,
            group.width,
            rows_per_program,
            MODE=_MODE_CODES[mode],
            NEED_SOURCES=need_sources,
            NEED_PARAMS=need_params,
            BLOCK_L=triton.next_power_of_2(len(group.members)),
            BLOCK_C=block,
            num_warps=num_warps,
        )
        if need_sources:
            for k, i in enumerate(group.members):
                if grads.sources[i] is None:
                    grads.sources[i] = _scatter(grad_rows[k], sources[i], out_hw, mode, block, num_warps)
        if need_params:
            _param_grads(
                group, partial_p.sum(0), partial_q.sum(0), weights, ln_weight, ln_bias, grads, weight_grads
            )
    if need_params:
        grads = grads._replace(layer_weights=torch.stack(weight_grads))
    return grads


def _scatter(
    grad_rows: torch.Tensor, x: torch.Tensor, out_hw: Sequence[int], mode: str, block: int, num_warps: int
) -> torch.Tensor:
    """The source gradient from the gradient of its resampled tokens (a gather per source token)."""
    batch, h, w, channels = x.shape
    grad = _new_buffer(x.shape, x.dtype, x.device)
    _grid_fuse_backward_scatter_kernel[(batch * h * w,)](
        grad,
        grad_rows,
        h,
        w,
        out_hw[0],
        out_hw[1],
        channels,
        _pytorch_scale(h, out_hw[0]),
        _pytorch_scale(w, out_hw[1]),
        MODE=_MODE_CODES[mode],
        BLOCK_C=block,
        num_warps=num_warps,
    )
    return grad


def _param_grads(
    group: _Group,
    p: torch.Tensor,
    q: torch.Tensor,
    weights: torch.Tensor,
    ln_weight: Sequence[torch.Tensor | None] | None,
    ln_bias: Sequence[torch.Tensor | None] | None,
    grads: GridFuseGrads,
    weight_grads: list[torch.Tensor | None],
) -> None:
    """Finish the parameter gradients of one group from its reduced partial sums.

    With ``p_i = sum_tokens dy * xhat_i`` and ``q = sum_tokens dy`` (dy the group's output grad):
    d ln_weight_i = a_i p_i, d ln_bias_i = a_i q, d a_i = <gamma_i, p_i> + <beta_i, q>.
    """
    for k, i in enumerate(group.members):
        gamma, beta = _param(ln_weight, i), _param(ln_bias, i)
        a = weights[i]
        if gamma is not None:
            grads.ln_weight[i] = (a * p[k]).to(gamma.dtype)
        if beta is not None:
            grads.ln_bias[i] = (a * q).to(beta.dtype)
        scaled = p[k].sum() if gamma is None else (gamma.float() * p[k]).sum()
        weight_grads[i] = scaled if beta is None else scaled + (beta.float() * q).sum()


@dataclass(frozen=True)
class _Config:
    """The non-tensor arguments of one ``grid_fuse`` call."""

    out_hw: tuple[int, int]
    groups: tuple[int, ...]
    mode: str
    eps: float


class GridFuseFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(config, layer_weights, *sources, *ln_weight, *ln_bias)`` where the
    LN lists hold one entry (tensor or None) per source."""

    @staticmethod
    def forward(ctx: Any, config: _Config, layer_weights: torch.Tensor, *tensors: torch.Tensor | None):
        count = len(config.groups)
        sources, ln_w, ln_b = tensors[:count], tensors[count : 2 * count], tensors[2 * count :]
        out, mean, rstd = grid_fuse_forward(
            sources,
            config.out_hw,
            config.groups,
            layer_weights,
            ln_w,
            ln_b,
            config.mode,
            config.eps,
            save_stats=any(ctx.needs_input_grad),
        )
        ctx.config = config
        ctx.save_for_backward(layer_weights, mean, rstd, *tensors)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor):
        config: _Config = ctx.config
        count = len(config.groups)
        layer_weights, mean, rstd, *tensors = ctx.saved_tensors
        sources, ln_w, ln_b = tensors[:count], tensors[count : 2 * count], tensors[2 * count :]
        needs = ctx.needs_input_grad
        need_sources = any(needs[2 : 2 + count])
        grads = grid_fuse_backward(
            grad_out,
            sources,
            config.out_hw,
            config.groups,
            layer_weights,
            ln_w,
            ln_b,
            config.mode,
            mean,
            rstd,
            need_sources=need_sources,
            need_params=needs[1] or any(needs[2 + count :]),
        )

        def wanted(values: Sequence[torch.Tensor | None] | None, offset: int) -> list[torch.Tensor | None]:
            return [v if needs[offset + k] else None for k, v in enumerate(values or [None] * count)]

        d_weights = None
        if needs[1]:
            d_weights = grads.layer_weights.to(layer_weights.dtype)
        return (
            None,
            d_weights,
            *wanted(grads.sources, 2),
            *wanted(grads.ln_weight, 2 + count),
            *wanted(grads.ln_bias, 2 + 2 * count),
        )


def triton_grid_fuse(
    sources: Sequence[torch.Tensor],
    out_hw: Sequence[int],
    *,
    groups: Sequence[int],
    layer_weights: torch.Tensor | Sequence[float],
    ln_weight: Sequence[torch.Tensor | None] | None = None,
    ln_bias: Sequence[torch.Tensor | None] | None = None,
    mode: str = "bilinear",
    eps: float = 1e-6,
) -> torch.Tensor:
    """``grid_fuse`` on the Triton kernels, differentiable; same arguments and result as
    :func:`kernels.reference.grid_fuse` (fp32 accumulation, output in the sources' dtype).

    Raises:
        ValueError: before any launch, for every bad argument :func:`grid_fuse_forward` rejects.
    """
    _check_kernel_inputs(sources, out_hw, groups, layer_weights, ln_weight, ln_bias, mode)
    _check_eps(eps)
    count = len(sources)
    if not isinstance(layer_weights, torch.Tensor):
        layer_weights = _layer_weight_table(layer_weights, sources[0].device)
    ln_w = list(ln_weight) if ln_weight is not None else [None] * count
    ln_b = list(ln_bias) if ln_bias is not None else [None] * count
    config = _Config((int(out_hw[0]), int(out_hw[1])), tuple(groups), mode, float(eps))
    return GridFuseFunction.apply(config, layer_weights, *sources, *ln_w, *ln_b)
