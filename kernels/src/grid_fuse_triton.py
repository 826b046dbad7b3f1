"""``grid_fuse`` on the Triton kernels of :mod:`encoder_fusion.kernels.grid_fuse_jit`, in layers from the
bottom up:

* host functions :func:`grid_fuse_forward` / :func:`grid_fuse_backward`: check the inputs (one
  :class:`~encoder_fusion.kernels.grid_fuse_args.GridFuseArgs`, through the plan cache of
  :mod:`encoder_fusion.kernels.grid_fuse_plan`), allocate the buffers, choose the grids and launch
  (1 kernel forward, 2 or 3 backward). They are the one host path: the autograd Function runs on
  them, and so do the tests and the benchmark tools;
* :class:`GridFuseFunction`, the autograd Function over them, and :func:`fuse`, which calls it only
  where a gradient is wanted (what ``encoder_fusion.kernels.grid_fuse`` dispatches to);
* :func:`triton_grid_fuse`, the functional face.

Every launch goes through :func:`encoder_fusion.kernels.launch.launch`, where tools without a GPU hook in.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import triton
from torch.autograd.function import once_differentiable

from encoder_fusion.kernels.checks import check_finite_output, check_grid_fuse_values, is_sequence
from encoder_fusion.kernels.grid_fuse_args import GridFuseArgs
from encoder_fusion.kernels.grid_fuse_jit import (
    _grid_fuse_backward_gather_kernel,
    _grid_fuse_backward_rows_kernel,
    _grid_fuse_forward_kernel,
    _grid_fuse_param_grads_kernel,
)
from encoder_fusion.kernels.grid_fuse_plan import (
    BACKWARD_ELEMENTS,
    MIN_TILES_PER_PROGRAM,
    Plan,
    Tiles,
    bits,
    planned,
    warps_for,
)
from encoder_fusion.kernels.launch import check_launchable, launch, sm_count


def _new_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels write is allocated here (tests poison it to catch unwritten elements)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def _check_buffer(
    name: str, tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``tensor`` if it is a contiguous buffer of this shape, dtype and device; else a ValueError."""
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"grid_fuse {name} must have shape {shape}, got {got}")
    if tensor.dtype != dtype or tensor.device != device:
        raise ValueError(
            f"grid_fuse {name} is {tensor.dtype} on {tensor.device}; it must be {dtype} on {device}"
        )
    if not tensor.is_contiguous():
        raise ValueError(f"grid_fuse {name} must be contiguous, got strides {tensor.stride()}")
    return tensor


def _row_programs(tiles: int, per_sm: int, device: torch.device) -> int:
    """Programs of the backward rows kernel: ``per_sm`` per multiprocessor, each walking at least
    MIN_TILES_PER_PROGRAM of the ``tiles`` (on the CPU interpreter: up to 4, so that runs of
    several tiles and several partial rows are exercised)."""
    count = sm_count(device)
    if count is None:
        return max(1, min(tiles, 4))
    return max(1, min(triton.cdiv(tiles, MIN_TILES_PER_PROGRAM), per_sm * count))


def _source_args(sources: Sequence[torch.Tensor], plan: Plan) -> tuple[tuple, ...]:
    """The per-slot source arguments of the kernels: pointers, strides, heights, widths."""
    xs = tuple(sources[i] for i in plan.source_of)
    return (
        xs,
        tuple(x.stride(0) for x in xs),
        tuple(x.stride(1) for x in xs),
        tuple(x.stride(2) for x in xs),
        tuple(x.shape[1] for x in xs),
        tuple(x.shape[2] for x in xs),
    )


def _affine_args(
    params: Sequence[torch.Tensor | None] | None, plan: Plan, placeholder: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Per-slot LayerNorm parameters; ``placeholder`` (never read: a HAS_ bit is 0) where absent.

    Compiled Triton cannot specialise a None inside a tuple argument, hence the placeholder.
    """
    if params is None:
        return (placeholder,) * len(plan.source_of)
    out = []
    for i in plan.source_of:
        p = params[i]
        out.append(placeholder if p is None else p if p.is_contiguous() else p.contiguous())
    return tuple(out)


def _layer_weight_table(layer_weights: torch.Tensor | Sequence[float], device: torch.device) -> torch.Tensor:
    """The layer weights as an (S,) tensor on the sources' device (kernels read any float dtype
    and any stride, so a tensor is used as is)."""
    if isinstance(layer_weights, torch.Tensor):
        return layer_weights.detach()
    return torch.tensor([float(v) for v in layer_weights], dtype=torch.float32, device=device)


def _channels_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/row/column strides but need channel stride 1; copy otherwise."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _call_shape(args: GridFuseArgs, plan: Plan) -> tuple[int, int, int, tuple[int, int, int]]:
    """(target height, target width, output tokens, output shape) of a planned call whose
    kernels can run here (:func:`encoder_fusion.kernels.launch.check_launchable`)."""
    batch = args.sources[0].shape[0]
    check_launchable(args.sources[0].device)
    height, width = plan.out_hw
    return height, width, batch * height * width, (batch, height * width, sum(plan.widths))


def grid_fuse_forward(
    args: GridFuseArgs,
    *,
    tiles: Tiles | None = None,
    out: torch.Tensor | None = None,
    save_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Check the inputs and run the forward kernel (one launch for all groups).

    Args:
        args: the call (:class:`~encoder_fusion.kernels.grid_fuse_args.GridFuseArgs`); sources may
            have any batch/row/column strides (channels with stride 1 are read in place, others are
            copied first).
        tiles: the token tiling (:class:`Tiles`); ``default_tiles`` of the widest group if None.
        out: optional contiguous (B, H*W, sum C) buffer of the sources' dtype to write into.
        save_stats: also return the per-token LayerNorm mean and rstd the backward pass needs.

    Returns:
        ``(out, mean, rstd)``: out is (B, H*W, sum C) in the sources' dtype; mean and rstd are
        (S, B*H*W) fp32 tensors (row i for sources[i]), or None without ``save_stats`` or with
        ``normalize=False``.

    Raises:
        ValueError: bad arguments (:mod:`encoder_fusion.kernels.checks`, shared with the reference), a dtype
            other than fp32/bf16/fp16, a CPU tensor without the Triton interpreter, a group wider
            than ``MAX_CHANNELS``, a malformed ``out`` or ``tiles``.
        RuntimeError: the Triton interpreter cannot run here
        (:func:`encoder_fusion.kernels.launch.interpreter_problem`).
    """
    plan = planned(args, tiles)
    check_grid_fuse_values(args)
    first = args.sources[0]
    height, width, rows, out_shape = _call_shape(args, plan)
    if out is None:
        out = _new_buffer(out_shape, first.dtype, first.device)
    else:
        _check_buffer("out", out, out_shape, first.dtype, first.device)
    sources = [_channels_contiguous(x) for x in args.sources]
    weights = _layer_weight_table(args.layer_weights, first.device)
    mean = rstd = None
    if save_stats and plan.normalize:
        mean, rstd = _new_buffer((2, len(sources), rows), torch.float32, first.device).unbind(0)
    launch(
        _grid_fuse_forward_kernel,
        (triton.cdiv(rows, plan.tiles.block_t),),
        out,
        *_source_args(sources, plan),
        weights,
        weights.stride(0),
        _affine_args(args.ln_weight, plan, first),
        _affine_args(args.ln_bias, plan, first),
        out if mean is None else mean,  # unread placeholders without STORE_STATS
        out if rstd is None else rstd,
        plan.columns,
        plan.widths,
        rows,
        height,
        width,
        out.shape[-1],
        float(args.eps),
        STORE_STATS=mean is not None,
        **plan.forward,
    )
    check_finite_output(args, out)
    return out, mean, rstd


class GridFuseGrads(NamedTuple):
    """Gradients from :func:`grid_fuse_backward`, one entry per source (None where not asked for)."""

    sources: list[torch.Tensor | None]
    layer_weights: torch.Tensor | None
    ln_weight: list[torch.Tensor | None]
    ln_bias: list[torch.Tensor | None]


def grid_fuse_backward(
    grad_out: torch.Tensor,
    args: GridFuseArgs,
    mean: torch.Tensor | None,
    rstd: torch.Tensor | None,
    *,
    need_sources: bool | Sequence[bool] = True,
    need_params: bool = True,
    tiles: Tiles | None = None,
) -> GridFuseGrads:
    """Gradients of ``grid_fuse`` given the gradient of its output; deterministic (no atomics).
    Launches the rows kernel, then the gather kernel (resampled sources whose gradient is asked
    for) and the parameter reduction (when ``need_params``).

    Args:
        grad_out: (B, H*W, sum C), the gradient of the forward output.
        args: the call, as in the forward.
        mean, rstd: the (S, B*H*W) fp32 statistics :func:`grid_fuse_forward` saved; unread (None)
            with ``normalize=False``.
        need_sources: compute the source gradients: one flag for all, or one per source.
        need_params: compute the gradients of layer_weights, ln_weight and ln_bias.
        tiles: the token tiling (:class:`Tiles`); ``default_tiles`` of the widest group if None.

    Returns:
        :class:`GridFuseGrads`: source gradients in the sources' dtype and layout (B, h, w, C);
        layer-weight gradient (S,) in layer_weights' dtype (fp32 for a list of numbers); LN
        gradients in each parameter's dtype; None where the parameter is None or the gradient was
        not asked for.

    Raises:
        ValueError: bad arguments as in :func:`grid_fuse_forward`, or a grad_out, mean or rstd of
            the wrong shape, dtype or device, or need_sources of the wrong length.
        RuntimeError: the Triton interpreter cannot run here
        (:func:`encoder_fusion.kernels.launch.interpreter_problem`).
    """
    plan = planned(args, tiles)
    device = args.sources[0].device
    count = len(args.sources)
    height, width, rows, out_shape = _call_shape(args, plan)
    if not isinstance(grad_out, torch.Tensor) or tuple(grad_out.shape) != out_shape:
        got = tuple(grad_out.shape) if isinstance(grad_out, torch.Tensor) else type(grad_out).__name__
        raise ValueError(f"grid_fuse grad_out must have shape {out_shape}, got {got}")
    if grad_out.device != device:
        raise ValueError(f"grid_fuse grad_out is on {grad_out.device}; the sources are on {device}")
    if plan.normalize:
        mean = _check_buffer("mean", mean, (count, rows), torch.float32, device)
        rstd = _check_buffer("rstd", rstd, (count, rows), torch.float32, device)
    else:
        mean = rstd = None
    if isinstance(need_sources, bool):
        need_sources = [need_sources] * count
    elif len(need_sources) != count:
        raise ValueError(
            f"grid_fuse need_sources has {len(need_sources)} flags; give one bool or one per source ({count})"
        )
    grad_out = grad_out.contiguous()
    sources = [_channels_contiguous(x) for x in args.sources]
    first = sources[0]
    weights = _layer_weight_table(args.layer_weights, device)

    grads = GridFuseGrads([None] * count, None, [None] * count, [None] * count)
    dr, resampled = [], []
    for k, i in enumerate(plan.source_of):
        x = sources[i]
        if not need_sources[i]:
            dr.append(first)  # placeholder, unread: its NEED_DR bit is 0
        elif plan.identity >> k & 1:  # identity: dr is the source gradient
            grads.sources[i] = _new_buffer(x.shape, x.dtype, device)
            dr.append(grads.sources[i])
        else:
            dr.append(_new_buffer((rows, x.shape[-1]), torch.float32, device))
            resampled.append(k)
    n_tiles = triton.cdiv(rows, plan.tiles.backward_block_t)
    tiles_per_program = triton.cdiv(n_tiles, _row_programs(n_tiles, plan.tiles.rows_per_sm, device))
    programs = triton.cdiv(n_tiles, tiles_per_program)
    c_max = max(plan.widths)
    partial_p = partial_q = grad_out  # unread placeholders without NEED_PARAMS
    if need_params:
        partial_p = _new_buffer((programs, count, c_max), torch.float32, device)
        partial_q = _new_buffer((programs, len(plan.widths), c_max), torch.float32, device)
    xs, *geometry = _source_args(sources, plan)
    ln_w = _affine_args(args.ln_weight, plan, first)
    launch(
        _grid_fuse_backward_rows_kernel,
        (programs,),
        grad_out,
        xs,
        *geometry,
        weights,
        weights.stride(0),
        ln_w,
        grad_out if mean is None else mean,  # unread placeholders without NORMALIZE
        grad_out if rstd is None else rstd,
        plan.columns,
        plan.widths,
        tuple(dr),
        partial_p,
        partial_q,
        rows,
        height,
        width,
        grad_out.shape[-1],
        c_max,
        tiles_per_program,
        NEED_DR=bits([need_sources[i] for i in plan.source_of]),
        NEED_PARAMS=need_params,
        **plan.backward_rows,
    )
    if resampled:
        for k in resampled:
            x = xs[k]
            grads.sources[plan.source_of[k]] = _new_buffer(x.shape, x.dtype, device)
        launch(
            _grid_fuse_backward_gather_kernel,
            (max(xs[k][..., 0].numel() for k in resampled), len(resampled)),
            tuple(grads.sources[plan.source_of[k]] for k in resampled),
            tuple(dr[k] for k in resampled),
            tuple(xs[k].shape[1] for k in resampled),
            tuple(xs[k].shape[2] for k in resampled),
            tuple(xs[k].shape[3] for k in resampled),
            first.shape[0],
            height,
            width,
            **plan.gather,
        )
    if need_params:
        weight_dtype = weights.dtype if weights.is_floating_point() else torch.float32
        d_weights = _new_buffer((count,), weight_dtype, device)
        d_ln = []
        for params, grad_list in ((args.ln_weight, grads.ln_weight), (args.ln_bias, grads.ln_bias)):
            for i in plan.source_of:
                p = None if params is None else params[i]
                grad_list[i] = None if p is None else _new_buffer(p.shape, p.dtype, device)
            d_ln.append(tuple(first if grad_list[i] is None else grad_list[i] for i in plan.source_of))
        # 8192 elements a step: as many partial rows per step as before the rows kernel doubled its
        # programs per SM (the reduction walks them one step after another)
        block_r = max(1, min(triton.next_power_of_2(programs), 8192 // plan.block_c))
        launch(
            _grid_fuse_param_grads_kernel,
            (count,),
            partial_p,
            partial_q,
            weights,
            weights.stride(0),
            ln_w,
            _affine_args(args.ln_bias, plan, first),
            d_weights,
            *d_ln,
            plan.widths,
            programs,
            c_max,
            BLOCK_R=block_r,
            num_warps=warps_for(block_r * plan.block_c, BACKWARD_ELEMENTS),
            **plan.param_grads,
        )
        grads = grads._replace(layer_weights=d_weights)
    return grads


def _tensors(args: GridFuseArgs) -> list[torch.Tensor | None]:
    """The tensors of a call that autograd must be given one by one: the sources, then the entries
    of ln_weight, then those of ln_bias (a list that is None adds none)."""
    return [*args.sources, *(args.ln_weight or ()), *(args.ln_bias or ())]


def _with_tensors(args: GridFuseArgs, layer_weights: Any, tensors: Sequence[Any]) -> GridFuseArgs:
    """``args`` with ``layer_weights`` and the entries of :func:`_tensors` replaced by ``tensors``
    (in that order; the lengths of the lists are those of ``args``)."""
    n = len(args.sources)
    m = n + len(args.ln_weight or ())
    return GridFuseArgs(  # not dataclasses.replace: the constructor is half its host time
        tensors[:n],
        args.out_hw,
        groups=args.groups,
        layer_weights=layer_weights,
        ln_weight=None if args.ln_weight is None else tensors[n:m],
        ln_bias=None if args.ln_bias is None else tensors[m:],
        mode=args.mode,
        eps=args.eps,
        normalize=args.normalize,
    )


class GridFuseFunction(torch.autograd.Function):
    """Autograd over :func:`grid_fuse_forward` / :func:`grid_fuse_backward`:
    ``apply(args, tiles, args.layer_weights, *tensors)``, where ``tensors`` are the call's sources
    and LayerNorm entries (:func:`_tensors`), given again one by one so that autograd tracks them."""

    @staticmethod
    def forward(
        ctx: Any,
        args: GridFuseArgs,
        tiles: Tiles | None,
        layer_weights: torch.Tensor | Sequence[float],
        *tensors: torch.Tensor | None,
    ):
        """Run the forward kernel, keeping the LayerNorm statistics for the backward."""
        out, mean, rstd = grid_fuse_forward(args, tiles=tiles, save_stats=True)
        is_tensor = isinstance(layer_weights, torch.Tensor)
        # The tensors are saved (autograd then checks them for changes in place); the context keeps
        # the other arguments, and plain-number layer weights, which are no tensor to save.
        ctx.args = _with_tensors(args, None if is_tensor else layer_weights, [None] * len(tensors))
        ctx.tiles = tiles
        ctx.save_for_backward(layer_weights if is_tensor else None, mean, rstd, *tensors)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor):
        """Gradients for the inputs that need one (None elsewhere), from the backward kernels."""
        weights, mean, rstd, *tensors = ctx.saved_tensors
        args = _with_tensors(ctx.args, ctx.args.layer_weights if weights is None else weights, tensors)
        needs = ctx.needs_input_grad
        count = len(args.sources)
        need_ln = needs[3 + count :]
        grads = grid_fuse_backward(
            grad_out, args, mean, rstd, need_sources=needs[3 : 3 + count],
            need_params=needs[2] or any(need_ln), tiles=ctx.tiles,
        )  # fmt: skip
        params = [
            *(grads.ln_weight if args.ln_weight is not None else ()),
            *(grads.ln_bias if args.ln_bias is not None else ()),
        ]
        return (
            None,
            None,
            grads.layer_weights if needs[2] else None,
            *grads.sources,
            *(g if need else None for g, need in zip(params, need_ln)),
        )


def _wants_grad(args: GridFuseArgs) -> bool:
    """Whether a call needs an autograd node: grad mode is on and an input requires grad. Lists of
    the wrong kind answer False: :func:`grid_fuse_forward` then names what is wrong with them."""
    if not torch.is_grad_enabled():
        return False
    ln_weight, ln_bias = args.ln_weight, args.ln_bias
    lists = [args.sources, () if ln_weight is None else ln_weight, () if ln_bias is None else ln_bias]
    if not all(is_sequence(entries) for entries in lists):
        return False
    return any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in itertools.chain([args.layer_weights], *lists)
    )


def fuse(args: GridFuseArgs, tiles: Tiles | None = None) -> torch.Tensor:
    """``grid_fuse`` of one :class:`~encoder_fusion.kernels.grid_fuse_args.GridFuseArgs` on the
    Triton kernels (what ``encoder_fusion.kernels.grid_fuse`` dispatches to): with no gradient wanted
    (``torch.no_grad`` or no input requiring grad) the forward kernel alone, without an autograd
    node; else through :class:`GridFuseFunction`. ``tiles``: as :func:`grid_fuse_forward`."""
    if not _wants_grad(args):
        return grid_fuse_forward(args, tiles=tiles)[0]
    return GridFuseFunction.apply(args, tiles, args.layer_weights, *_tensors(args))


def triton_grid_fuse(*args: Any, tiles: Tiles | None = None, **kwargs: Any) -> torch.Tensor:
    """``grid_fuse`` on the Triton kernels, differentiable: ``triton_grid_fuse(sources, out_hw, *,
    groups, layer_weights, ln_weight=None, ln_bias=None, mode="bilinear", eps=1e-6, normalize=True,
    tiles=None)``, the arguments and result of :func:`encoder_fusion.kernels.reference.grid_fuse`
    (fp32 accumulation, output in the sources' dtype) and the token tiling ``tiles`` of both passes
    (:class:`Tiles`; ``default_tiles`` if None).

    Host cost: a call whose signature (shapes, strides, dtypes, devices, groups, affine pattern,
    mode, normalize) matches one of the last 64 skips the signature checks; with no gradient wanted
    the forward kernel is launched without an autograd node (:func:`fuse`).

    Raises:
        ValueError: before any launch, for every bad argument :func:`grid_fuse_forward` rejects.
        RuntimeError: the Triton interpreter cannot run here
        (:func:`encoder_fusion.kernels.launch.interpreter_problem`).
    """
    return fuse(GridFuseArgs(*args, **kwargs), tiles)
