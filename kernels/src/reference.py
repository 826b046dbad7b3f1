"""``grid_fuse`` in plain PyTorch: the definition the Triton kernel must match.

For each group (output slot) g, with sources i in g::

    out[..., slot g] = sum_i layer_weights[i] * LN_i(resample_i(x_i -> out_hw))

``resample`` has ``F.interpolate`` semantics (bilinear with ``align_corners=False``, nearest, or
area) and is the identity when a grid already has the target size; ``LN_i`` is a LayerNorm over
channels with the optional affine ``(ln_weight[i], ln_bias[i])``, or the identity with
``normalize=False`` (raw features, as the papers that concatenate block outputs use them; no affine
then). Statistics are computed in at least float32; the output has the sources' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from encoder_fusion.kernels.checks import (
    MODES,
    check_finite_output,
    check_grid_fuse_inputs,
    check_grid_fuse_values,
)
from encoder_fusion.kernels.grid_fuse_args import GridFuseArgs, grid_fuse_face

__all__ = ["MODES", "fuse", "grid_fuse", "resample"]


def resample(x: torch.Tensor, out_hw: Sequence[int], mode: str) -> torch.Tensor:
    """Resample a channels-last grid (B, h, w, C) to (B, H, W, C) with ``F.interpolate``'s ``mode``
    (``align_corners=False`` where it applies); identity when it already fits."""
    if tuple(x.shape[1:3]) == tuple(out_hw):
        return x
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    moved = F.interpolate(x.permute(0, 3, 1, 2), size=tuple(out_hw), mode=mode, **kwargs)
    return moved.permute(0, 2, 3, 1)


def fuse(args: GridFuseArgs) -> torch.Tensor:
    """``grid_fuse`` of one :class:`~encoder_fusion.kernels.grid_fuse_args.GridFuseArgs`: the
    definition (see the module docstring); :func:`grid_fuse` is its public face."""
    widths = check_grid_fuse_inputs(args)
    check_grid_fuse_values(args)
    sources, ln_weight, ln_bias = args.sources, args.ln_weight, args.ln_bias
    dtype = sources[0].dtype
    compute = torch.promote_types(dtype, torch.float32)
    weights = torch.as_tensor(args.layer_weights, device=sources[0].device)
    slots: list[torch.Tensor | None] = [None] * len(widths)
    for i, (g, x) in enumerate(zip(args.groups, sources)):
        aligned = resample(x.to(compute), args.out_hw, args.mode)
        if args.normalize:
            w = ln_weight[i] if ln_weight is not None else None
            b = ln_bias[i] if ln_bias is not None else None
            aligned = F.layer_norm(
                aligned,
                (aligned.shape[-1],),
                None if w is None else w.to(compute),
                None if b is None else b.to(compute),
                float(args.eps),
            )
        term = weights[i].to(compute) * aligned
        slot = slots[g]
        slots[g] = term if slot is None else slot + term
    # every slot 0..G-1 has a source: the checks accept only groups that number them all
    out = torch.cat([slot for slot in slots if slot is not None], dim=-1)
    out = out.reshape(out.shape[0], -1, out.shape[-1]).to(dtype)
    check_finite_output(args, out)
    return out


@grid_fuse_face
def grid_fuse(args: GridFuseArgs) -> torch.Tensor:
    """Align, LayerNorm, weight and merge channels-last grids; see the module docstring.

    ``grid_fuse(sources, out_hw, *, groups, layer_weights, ln_weight=None, ln_bias=None,
    mode="bilinear", eps=1e-6, normalize=True)``; the arguments are those of
    :class:`~encoder_fusion.kernels.grid_fuse_args.GridFuseArgs`.

    Returns:
        (B, H*W, sum of group widths) in the sources' dtype, slots in group order.

    Raises:
        ValueError: a bad argument (:mod:`encoder_fusion.kernels.checks`, the validation the Triton path
        shares).
    """
    return fuse(args)
