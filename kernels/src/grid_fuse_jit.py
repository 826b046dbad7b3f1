"""``grid_fuse`` in Triton: the jitted kernels and the device functions they inline.

* ``_grid_fuse_forward_kernel``: ONE launch for all groups. Each program takes a tile of
  ``BLOCK_T`` output tokens and, for every group, every source of that group: it computes the
  resample taps of its tokens in registers, gathers the channels it needs, takes the LayerNorm
  statistics in fp32, applies the affine and the layer weight and accumulates; each group's sum is
  stored straight into its channel slice of the ``(B, H*W, sum C)`` output. Nothing else touches
  global memory, except the per-token mean and rstd (two fp32 numbers per source and token) when a
  backward pass will need them. Loads are split from their use (``_load_taps`` /
  ``_combine_taps``) so a program issues the next source's loads before it reduces the current
  one: the bytes in flight, not arithmetic, bound this kernel.
* ``_grid_fuse_backward_rows_kernel``: one launch, a fixed number of programs each walking a run of
  token tiles: the gradient of each resampled token (``dr``) and per-program fp32 partial sums for
  the parameter gradients, carried in registers across the run as token tiles and summed over
  tokens once at its end.
* ``_grid_fuse_param_grads_kernel``: one program per source reduces the partial sums in a fixed
  order and writes the gradients of its LayerNorm weight and bias and of its layer weight.
* ``_grid_fuse_backward_gather_kernel``: one launch for every resampled source: turns ``dr`` into
  the source gradient by gathering (one program per source token walks the few output tokens whose
  taps read it). A source whose grid already matches the target gets ``dr`` as its gradient directly.

The host side (:mod:`encoder_fusion.kernels.grid_fuse_triton`) launches 1 kernel forward, 2 or 3 backward.

Which sources belong to which group, which already have the target grid and which have a LayerNorm
weight or bias, and whether sources are layer-normalised at all (``normalize=False`` sums the raw
resampled sources: no statistics are taken, stored or read), are compile-time constants (a small
tuple and bit masks), so the kernels hold no run-time branches for them and the host never
materialises an identity affine.

The backward pass uses no atomics: for a given shape and device its result is bit-for-bit
reproducible.

Resampling follows PyTorch's ``F.interpolate`` exactly: ``bilinear`` with ``align_corners=False``
(source index ``scale*(o+0.5)-0.5`` clamped at 0, taps ``i0`` and ``i0+1`` clamped to the grid,
weights ``1-lambda`` and ``lambda``), ``nearest`` (legacy ``floor(o*scale)``), ``area`` (adaptive
average pooling windows ``[floor(o*in/out), ceil((o+1)*in/out))``), with PyTorch's float32
``scale = in / out``. A grid that already has the target size is copied as is.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# The type checker reads the jitted functions as plain Python, which they are not; the few lines it
# cannot follow say so by rule: tl.static_range unrolls at compile time (its Python __iter__ only
# raises), tl.max of a block is a scalar where range() takes it, and a jitted function converts a
# literal to its tl.constexpr parameter.

# Kernel-side codes of the resample modes (a constexpr: each mode compiles its own kernel).
BILINEAR = tl.constexpr(0)
NEAREST = tl.constexpr(1)
AREA = tl.constexpr(2)
MODE_CODES = {"bilinear": BILINEAR.value, "nearest": NEAREST.value, "area": AREA.value}


@triton.jit
def _scale(n_in, n_out):
    """PyTorch's resample scale: ``float(n_in) / n_out`` rounded once to float32."""
    return tl.math.div_rn(tl.cast(n_in, tl.float32), tl.cast(n_out, tl.float32))


@triton.jit
def _bilinear_axis(o, n_in, n_out):
    """Bilinear taps of output indices ``o`` along one axis: (i0, i1, lambda); i1 == i0 on the last
    input row, where PyTorch reads the same element twice."""
    src = tl.maximum(_scale(n_in, n_out) * (tl.cast(o, tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(tl.cast(src, tl.int64), n_in - 1)  # src >= 0, so truncation is floor
    lam = src - tl.cast(i0, tl.float32)
    i1 = tl.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, lam


@triton.jit
def _nearest_axis(o, n_in, n_out):
    """PyTorch's legacy nearest index ``min(floor(o * scale), n_in - 1)``."""
    return tl.minimum(tl.floor(tl.cast(o, tl.float32) * _scale(n_in, n_out)).to(tl.int64), n_in - 1)


@triton.jit
def _area_axis(o, n_in, n_out):
    """adaptive_avg_pool2d window of output index ``o``: (first input index, count)."""
    first = (o * n_in) // n_out
    return first, ((o + 1) * n_in + n_out - 1) // n_out - first


@triton.jit
def _axis_weight(o, i, n_in, n_out, MODE: tl.constexpr):
    """Weight with which output index ``o`` reads input index ``i`` along one axis (0 if it does not)."""
    if MODE == BILINEAR:
        i0, i1, lam = _bilinear_axis(o, n_in, n_out)
        return tl.where(i == i0, 1.0 - lam, 0.0) + tl.where(i == i1, lam, 0.0)
    elif MODE == NEAREST:
        return tl.where(i == _nearest_axis(o, n_in, n_out), 1.0, 0.0)
    else:
        first, count = _area_axis(o, n_in, n_out)
        return tl.where((i >= first) & (i < first + count), 1.0 / tl.cast(count, tl.float32), 0.0)


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
def _add_pairs(a0, a1, b0, b1):
    """Combine of a two-value sum reduction (``tl.reduce`` of a pair of tensors)."""
    return a0 + b0, a1 + b1


@triton.jit
def _load_rows(row_ptrs, cols, mask):
    """A (BLOCK_T, BLOCK_C) tile: channels ``cols`` of the tokens at ``row_ptrs``, in the source's
    dtype (16-bit tiles stay packed in registers until they are combined)."""
    return tl.load(row_ptrs[:, None] + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_taps(
    x_ptr, stride_b, stride_y, stride_x, h, w, b, oy, ox, H, W, cols, mask,
    MODE: tl.constexpr, IDENTITY: tl.constexpr,
):  # fmt: skip
    """Issue the loads of one source grid for the output tokens (b, oy, ox) (vectors of BLOCK_T):
    a tuple of (BLOCK_T, BLOCK_C) tiles that :func:`_combine_taps` turns into the resampled tile.

    Identity and nearest read one tile, bilinear four (a fixed number, so all loads are independent
    and in flight together), area walks each tile's largest window and returns the fp32 mean.
    Splitting load from combine lets a kernel issue the next source's loads before it reduces the
    current one."""
    base = x_ptr + b * stride_b
    if IDENTITY:
        return (_load_rows(base + oy * stride_y + ox * stride_x, cols, mask),)
    elif MODE == BILINEAR:  # PyTorch's formula, the same element twice at the last row / column
        y0, y1, _ = _bilinear_axis(oy, h, H)
        x0, x1, _ = _bilinear_axis(ox, w, W)
        row0 = base + y0 * stride_y
        row1 = base + y1 * stride_y
        return (
            _load_rows(row0 + x0 * stride_x, cols, mask),
            _load_rows(row0 + x1 * stride_x, cols, mask),
            _load_rows(row1 + x0 * stride_x, cols, mask),
            _load_rows(row1 + x1 * stride_x, cols, mask),
        )
    elif MODE == NEAREST:
        iy = _nearest_axis(oy, h, H)
        ix = _nearest_axis(ox, w, W)
        return (_load_rows(base + iy * stride_y + ix * stride_x, cols, mask),)
    else:  # AREA: windows differ per token; walk the largest one of the tile, masking the rest
        y0, ny = _area_axis(oy, h, H)
        x0, nx = _area_axis(ox, w, W)
        acc = tl.zeros(mask.shape, dtype=tl.float32)
        for ty in range(0, tl.max(ny, axis=0)):  # pyright: ignore[reportArgumentType]
            row = base + (y0 + ty) * stride_y
            for tx in range(0, tl.max(nx, axis=0)):  # pyright: ignore[reportArgumentType]
                inside = (ty < ny) & (tx < nx)
                acc += _load_rows(row + (x0 + tx) * stride_x, cols, mask & inside[:, None]).to(tl.float32)
        return (acc / (ny * nx).to(tl.float32)[:, None],)


@triton.jit
def _combine_taps(taps, h, w, oy, ox, H, W, MODE: tl.constexpr, IDENTITY: tl.constexpr):
    """The resampled (BLOCK_T, BLOCK_C) fp32 tile from the tiles :func:`_load_taps` returned."""
    if IDENTITY:
        return taps[0].to(tl.float32)
    elif MODE == BILINEAR:
        _, _, ly = _bilinear_axis(oy, h, H)
        _, _, lx = _bilinear_axis(ox, w, W)
        lx = lx[:, None]
        top = taps[0].to(tl.float32) * (1.0 - lx) + taps[1].to(tl.float32) * lx
        bottom = taps[2].to(tl.float32) * (1.0 - lx) + taps[3].to(tl.float32) * lx
        return top * (1.0 - ly[:, None]) + bottom * ly[:, None]
    else:  # NEAREST: the tile itself; AREA: already the fp32 window mean
        return taps[0].to(tl.float32)


@triton.jit
def _load_slot(
    k: tl.constexpr, grids, tile, WIDTHS, GROUP_OF: tl.constexpr, IDENTITY: tl.constexpr, MODE: tl.constexpr
):
    """:func:`_load_taps` of slot ``k`` (a compile-time index), masked to its group's width.
    ``grids``: the per-slot source arguments ``(X, SB, SY, SX, HS, WS)`` of a kernel; ``tile``: the
    output tokens ``(b, oy, ox, live)`` of its tile, the target grid ``(H, W)`` and the channels."""
    X, SB, SY, SX, HS, WS = grids
    b, oy, ox, live, H, W, cols = tile
    mask = live[:, None] & (cols < WIDTHS[GROUP_OF[k]])[None, :]
    return _load_taps(
        X[k], SB[k], SY[k], SX[k], HS[k], WS[k], b, oy, ox, H, W, cols, mask, MODE, (IDENTITY >> k) & 1
    )


@triton.jit
def _grid_fuse_forward_kernel(
    Y_ptr,  # output (B*H*W, y_cols) in the sources' dtype; group g fills columns COLS[g] on
    X,  # S source pointers in slot order, each (B, h, w, C_g) with channel stride 1
    SB, SY, SX,  # S batch / row / column strides of each source, in elements
    HS, WS,  # S source grid heights and widths
    LW_ptr,  # (S,) layer weights, any float dtype, indexed by source (not slot), stride lw_stride
    lw_stride,
    LN_W, LN_B,  # S pointers (C_g,): LayerNorm affine per slot; any tensor where the HAS_ bit is 0
    MEAN_ptr, RSTD_ptr,  # (S, rows) fp32 each, by source index: written when NORMALIZE and STORE_STATS
    COLS, WIDTHS,  # G first output columns and widths of the groups
    rows,
    H,
    W,
    y_cols,
    eps,
    GROUP_OF: tl.constexpr,  # S group indices, one per slot, non-decreasing
    SOURCE_OF: tl.constexpr,  # S source indices, one per slot
    IDENTITY: tl.constexpr,  # bit k: slot k already has the target grid
    HAS_W: tl.constexpr,  # bit k: slot k has a LayerNorm weight
    HAS_B: tl.constexpr,  # bit k: slot k has a LayerNorm bias
    MODE: tl.constexpr,
    NORMALIZE: tl.constexpr,  # LayerNorm each resampled source; else sum them raw (no affine)
    STORE_STATS: tl.constexpr,
    PREFETCH: tl.constexpr,  # issue the next slot's loads before reducing the current one
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = tokens < rows
    b = tokens // (H * W)
    oy = (tokens % (H * W)) // W
    ox = tokens % W
    cols = tl.arange(0, BLOCK_C)
    grids = (X, SB, SY, SX, HS, WS)
    tile = (b, oy, ox, live, H, W, cols)
    if PREFETCH:
        pending = _load_slot(0, grids, tile, WIDTHS, GROUP_OF, IDENTITY, MODE)  # pyright: ignore[reportArgumentType]
    for g in tl.static_range(len(WIDTHS)):  # pyright: ignore[reportGeneralTypeIssues]
        C = WIDTHS[g]
        mask = live[:, None] & (cols < C)[None, :]
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for k in tl.static_range(len(X)):  # pyright: ignore[reportGeneralTypeIssues]
            if GROUP_OF[k] == g:
                if PREFETCH:  # this slot's loads are in flight; start the next slot's (any group)
                    taps = pending
                    if k + 1 < len(X):
                        pending = _load_slot(k + 1, grids, tile, WIDTHS, GROUP_OF, IDENTITY, MODE)
                else:
                    taps = _load_slot(k, grids, tile, WIDTHS, GROUP_OF, IDENTITY, MODE)
                r = _combine_taps(taps, HS[k], WS[k], oy, ox, H, W, MODE, (IDENTITY >> k) & 1)
                if NORMALIZE:
                    mean = tl.sum(r, axis=1) / C
                    centred = tl.where(mask, r - mean[:, None], 0.0)
                    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / C + eps)
                    if STORE_STATS:
                        tl.store(MEAN_ptr + SOURCE_OF[k] * rows + tokens, mean, mask=live)
                        tl.store(RSTD_ptr + SOURCE_OF[k] * rows + tokens, rstd, mask=live)
                    y = centred * rstd[:, None]
                    if (HAS_W >> k) & 1:
                        y *= tl.load(LN_W[k] + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
                    if (HAS_B >> k) & 1:
                        y += tl.load(LN_B[k] + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
                else:
                    y = r
                acc += tl.load(LW_ptr + SOURCE_OF[k] * lw_stride).to(tl.float32) * y
        y_ptrs = Y_ptr + tokens[:, None] * y_cols + COLS[g] + cols[None, :]
        tl.store(y_ptrs, acc.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grid_fuse_backward_rows_kernel(
    DY_ptr,  # gradient of the output, (B*H*W, y_cols); group g in columns COLS[g] on
    X, SB, SY, SX, HS, WS, LW_ptr, lw_stride, LN_W,  # as in the forward
    MEAN_ptr, RSTD_ptr,  # (S, rows) fp32 each, by source index, from the forward (when NORMALIZE)
    COLS, WIDTHS,
    DR,  # S pointers (rows, C_g) per slot: gradient of the resampled tokens (of the source itself
    # for identity slots), in that buffer's dtype; any tensor where the NEED_DR bit is 0
    P_ptr,  # (programs, S, c_max) fp32 per program and slot: sum over its tokens of dy * xhat
    Q_ptr,  # (programs, G, c_max) fp32 per program and group: sum over its tokens of dy
    rows,
    H,
    W,
    y_cols,
    c_max,
    tiles_per_program,
    GROUP_OF: tl.constexpr,
    FIRST_SLOT: tl.constexpr,  # G: the first slot of each group
    SOURCE_OF: tl.constexpr,
    IDENTITY: tl.constexpr,
    HAS_W: tl.constexpr,
    NEED_DR: tl.constexpr,  # bit k: write dr of slot k
    NEED_PARAMS: tl.constexpr,
    MODE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    PREFETCH: tl.constexpr,  # issue the next slot's loads before reducing the current one
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    grids = (X, SB, SY, SX, HS, WS)
    # Groups in the outer (static) loop: the parameter partial sums of one group's sources stay in
    # registers across this program's run of tiles, so each program writes one row of partials per
    # source and only one group's sums are live at a time. They are (BLOCK_T, BLOCK_C) tiles: the
    # token axis is summed once after the run, not once per tile.
    # (Triton kernels build tuples by concatenation: starred unpacking is not supported there.)
    for g in tl.static_range(len(WIDTHS)):  # pyright: ignore[reportGeneralTypeIssues]
        C = WIDTHS[g]
        col_mask = cols < C
        p_acc = ()
        for k in tl.static_range(len(X)):  # pyright: ignore[reportGeneralTypeIssues]
            if GROUP_OF[k] == g:
                p_acc = p_acc + (tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32),)  # noqa: RUF005
        q_acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for t in range(0, tiles_per_program):
            tokens = (pid * tiles_per_program + t) * BLOCK_T + tl.arange(0, BLOCK_T)
            live = tokens < rows
            b = tokens // (H * W)
            oy = (tokens % (H * W)) // W
            ox = tokens % W
            tile = (b, oy, ox, live, H, W, cols)
            mask = live[:, None] & col_mask[None, :]
            dy_ptrs = DY_ptr + tokens[:, None] * y_cols + COLS[g] + cols[None, :]
            dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
            if NEED_PARAMS:
                q_acc += dy
            if PREFETCH:  # the group's first slot is loaded with dy, each slot then the next one
                pending = _load_slot(FIRST_SLOT[g], grids, tile, WIDTHS, GROUP_OF, IDENTITY, MODE)
            new_p = ()
            for k in tl.static_range(len(X)):  # pyright: ignore[reportGeneralTypeIssues]
                if GROUP_OF[k] == g:
                    if PREFETCH:
                        taps = pending
                        # nested: the compile-time `and` would index GROUP_OF past the last slot
                        if k + 1 < len(X):  # noqa: SIM102
                            if GROUP_OF[k + 1] == g:
                                pending = _load_slot(k + 1, grids, tile, WIDTHS, GROUP_OF, IDENTITY, MODE)
                    else:
                        taps = _load_slot(k, grids, tile, WIDTHS, GROUP_OF, IDENTITY, MODE)
                    r = _combine_taps(taps, HS[k], WS[k], oy, ox, H, W, MODE, (IDENTITY >> k) & 1)
                    # xhat is what the layer weight multiplied: the normalised token, or the raw one
                    if NORMALIZE:
                        mean = tl.load(MEAN_ptr + SOURCE_OF[k] * rows + tokens, mask=live, other=0.0)
                        rstd = tl.load(RSTD_ptr + SOURCE_OF[k] * rows + tokens, mask=live, other=0.0)
                        xhat = tl.where(mask, (r - mean[:, None]) * rstd[:, None], 0.0)
                    else:
                        xhat = tl.where(mask, r, 0.0)
                    if NEED_PARAMS:
                        new_p = new_p + (p_acc[len(new_p)] + dy * xhat,)  # noqa: RUF005
                    if (NEED_DR >> k) & 1:
                        gy = dy * tl.load(LW_ptr + SOURCE_OF[k] * lw_stride).to(tl.float32)
                        if NORMALIZE:
                            if (HAS_W >> k) & 1:
                                gamma = tl.load(LN_W[k] + cols, mask=col_mask, other=0.0).to(tl.float32)
                                gy = gy * gamma[None, :]
                            c1, c2 = tl.reduce((gy * xhat, gy), 1, _add_pairs)  # one pass, both sums
                            dr = (gy - (xhat * (c1 / C)[:, None] + (c2 / C)[:, None])) * rstd[:, None]
                        else:
                            dr = gy
                        dr_ptr = DR[k]
                        dr_ptrs = dr_ptr + tokens[:, None] * C + cols[None, :]
                        tl.store(dr_ptrs, dr.to(dr_ptr.dtype.element_ty), mask=mask)
            if NEED_PARAMS:
                p_acc = new_p
        if NEED_PARAMS:
            for m in tl.static_range(len(p_acc)):  # pyright: ignore[reportGeneralTypeIssues]
                row = pid * len(X) + FIRST_SLOT[g] + m
                tl.store(P_ptr + row * c_max + cols, tl.sum(p_acc[m], axis=0), mask=col_mask)
            tl.store(Q_ptr + (pid * len(WIDTHS) + g) * c_max + cols, tl.sum(q_acc, axis=0), mask=col_mask)


@triton.jit
def _grid_fuse_param_grads_kernel(
    P_ptr,  # (programs, S, c_max) fp32 partials from the rows kernel
    Q_ptr,  # (programs, G, c_max) fp32 partials from the rows kernel
    LW_ptr,  # (S,) layer weights by source index, stride lw_stride
    lw_stride,
    LN_W, LN_B,  # S pointers (C_g,) per slot; any tensor where the HAS_ bit is 0
    DLW_ptr,  # (S,) gradient of the layer weights, by source index
    DLN_W, DLN_B,  # S pointers (C_g,) per slot: gradients of the LayerNorm weight and bias
    WIDTHS,
    programs,
    c_max,
    GROUP_OF: tl.constexpr,
    SOURCE_OF: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    # With p = sum_tokens dy * xhat and q = sum_tokens dy (dy the group's output gradient):
    # d ln_weight = a p, d ln_bias = a q, d a = <gamma, p> + <beta, q> (gamma 1, beta 0 if absent;
    # without NORMALIZE xhat is the raw token and there is no affine).
    slot = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    lanes = tl.arange(0, BLOCK_R)
    for k in tl.static_range(len(LN_W)):  # pyright: ignore[reportGeneralTypeIssues]
        if slot == k:
            col_mask = cols < WIDTHS[GROUP_OF[k]]
            p = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            q = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            for start in range(0, programs, BLOCK_R):
                r = start + lanes
                mask = (r < programs)[:, None] & col_mask[None, :]
                p += tl.load(
                    P_ptr + (r[:, None] * len(LN_W) + k) * c_max + cols[None, :], mask=mask, other=0.0
                )
                q += tl.load(
                    Q_ptr + (r[:, None] * len(WIDTHS) + GROUP_OF[k]) * c_max + cols[None, :],
                    mask=mask,
                    other=0.0,
                )
            p_sum = tl.sum(p, axis=0)
            q_sum = tl.sum(q, axis=0)
            a = tl.load(LW_ptr + SOURCE_OF[k] * lw_stride).to(tl.float32)
            if (HAS_W >> k) & 1:
                gamma = tl.load(LN_W[k] + cols, mask=col_mask, other=0.0).to(tl.float32)
                d_a = tl.sum(gamma * p_sum, axis=0)
                tl.store(DLN_W[k] + cols, (a * p_sum).to(DLN_W[k].dtype.element_ty), mask=col_mask)
            else:
                d_a = tl.sum(p_sum, axis=0)
            if (HAS_B >> k) & 1:
                beta = tl.load(LN_B[k] + cols, mask=col_mask, other=0.0).to(tl.float32)
                d_a += tl.sum(beta * q_sum, axis=0)
                tl.store(DLN_B[k] + cols, (a * q_sum).to(DLN_B[k].dtype.element_ty), mask=col_mask)
            tl.store(DLW_ptr + SOURCE_OF[k], d_a.to(DLW_ptr.dtype.element_ty))


@triton.jit
def _grid_fuse_backward_gather_kernel(
    DX,  # K pointers, each a source gradient (B, h_k, w_k, C_k), contiguous
    DR,  # K pointers, each (B*H*W, C_k) fp32: gradient of that source's resampled tokens
    HS, WS, CS,  # K source heights, widths and channel counts
    batch,
    H,
    W,
    MODE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    for k in tl.static_range(len(DX)):  # pyright: ignore[reportGeneralTypeIssues]
        h = HS[k]
        w = WS[k]
        if (which == k) & (token < batch * h * w):
            b = token // (h * w)
            iy = (token % (h * w)) // w
            ix = token % w
            mask = cols < CS[k]
            y_lo, y_hi = _axis_readers(iy, h, H, MODE)
            x_lo, x_hi = _axis_readers(ix, w, W, MODE)
            acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
            # The exact weights are 0 for window entries that do not read this token; they skip the load.
            for oy in range(y_lo, y_hi + 1):
                wy = _axis_weight(oy, iy, h, H, MODE)
                for ox in range(x_lo, x_hi + 1):
                    weight = wy * _axis_weight(ox, ix, w, W, MODE)
                    if weight != 0.0:
                        g_ptrs = DR[k] + ((b * H + oy) * W + ox) * CS[k] + cols
                        acc += weight * tl.load(g_ptrs, mask=mask, other=0.0)
            dx_ptr = DX[k]
            tl.store(dx_ptr + token * CS[k] + cols, acc.to(dx_ptr.dtype.element_ty), mask=mask)


# Triton decides when a kernel is decorated whether it is compiled or interpreted (TRITON_INTERPRET).
INTERPRETED = isinstance(_grid_fuse_forward_kernel, InterpretedFunction)
