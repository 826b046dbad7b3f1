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

MODES = ("bilinear", "nearest", "area")


def check_grid_fuse_inputs(
    sources: Sequence[torch.Tensor],
    out_hw: Sequence[int],
    groups: Sequence[int],
    layer_weights: torch.Tensor | Sequence[float],
    ln_weight: Sequence[torch.Tensor | None] | None,
    ln_bias: Sequence[torch.Tensor | None] | None,
    mode: str,
    normalize: bool,
) -> list[int]:
    """Validate ``grid_fuse`` arguments; return the channel width of each group, in group order.

    Raises:
        ValueError: naming the argument, the value and what is accepted.
    """
    if mode not in MODES:
        raise ValueError(f"grid_fuse mode={mode!r} is unknown; accepted: {', '.join(MODES)}")
    if not isinstance(normalize, bool):
        raise ValueError(f"grid_fuse normalize must be True or False, got {normalize!r}")
    if isinstance(sources, torch.Tensor) or len(sources) == 0:
        raise ValueError("grid_fuse sources must be a non-empty list of (B, h, w, C) tensors")
    if (
        len(out_hw) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in out_hw)
    ):
        raise ValueError(f"grid_fuse out_hw must be a pair of positive ints (H, W), got {out_hw!r}")
    count = len(sources)
    for i, x in enumerate(sources):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"grid_fuse sources[{i}] must be a 4-D (B, h, w, C) tensor, got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"grid_fuse sources[{i}] must be floating point, got {x.dtype}")
        if min(x.shape) == 0:
            raise ValueError(f"grid_fuse sources[{i}] has an empty dimension: {tuple(x.shape)}")
    batch = sources[0].shape[0]
    for i, x in enumerate(sources):
        if x.shape[0] != batch:
            raise ValueError(
                f"grid_fuse sources[{i}] has batch size {x.shape[0]} but sources[0] has {batch}; "
                "all sources must share the batch size"
            )
        if x.dtype != sources[0].dtype or x.device != sources[0].device:
            raise ValueError(
                f"grid_fuse sources[{i}] is {x.dtype} on {x.device} but sources[0] is "
                f"{sources[0].dtype} on {sources[0].device}; all sources must share dtype and device"
            )
    if len(groups) != count or not all(isinstance(g, int) and not isinstance(g, bool) for g in groups):
        raise ValueError(f"grid_fuse groups must hold one int per source ({count}), got {list(groups)!r}")
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
    weight_count = layer_weights.numel() if isinstance(layer_weights, torch.Tensor) else len(layer_weights)
    if isinstance(layer_weights, torch.Tensor) and layer_weights.ndim != 1:
        raise ValueError(f"grid_fuse layer_weights must be 1-D, got shape {tuple(layer_weights.shape)}")
    if weight_count != count:
        raise ValueError(
            f"grid_fuse layer_weights has {weight_count} entries but there are {count} sources; "
            "give one weight per source"
        )
    for name, params in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if params is None:
            continue
        if not normalize and any(p is not None for p in params):
            raise ValueError(
                f"grid_fuse {name} is given with normalize=False; the affine belongs to the LayerNorm "
                f"that normalize=False skips: pass {name}=None"
            )
        if len(params) != count:
            raise ValueError(f"grid_fuse {name} has {len(params)} entries; give one per source ({count})")
        for i, (p, x) in enumerate(zip(params, sources)):
            if p is not None and tuple(p.shape) != (x.shape[-1],):
                raise ValueError(
                    f"grid_fuse {name}[{i}] has shape {tuple(p.shape)}; sources[{i}] needs ({x.shape[-1]},)"
                )
    return [widths[g] for g in range(len(widths))]


def resample(x: torch.Tensor, out_hw: Sequence[int], mode: str) -> torch.Tensor:
    """Resample a channels-last grid (B, h, w, C) to (B, H, W, C) with ``F.interpolate``'s ``mode``
    (``align_corners=False`` where it applies); identity when it already fits."""
    if tuple(x.shape[1:3]) == tuple(out_hw):
        return x
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    moved = F.interpolate(x.permute(0, 3, 1, 2), size=tuple(out_hw), mode=mode, **kwargs)
    return moved.permute(0, 2, 3, 1)


def grid_fuse(
    sources: Sequence[torch.Tensor],
    out_hw: Sequence[int],
    *,
    groups: Sequence[int],
    layer_weights: torch.Tensor | Sequence[float],
    ln_weight: Sequence[torch.Tensor | None] | None = None,
    ln_bias: Sequence[torch.Tensor | None] | None = None,
    mode: str = "bilinear",
    eps: float = 1e-6,
    normalize: bool = True,
) -> torch.Tensor:
    """Align, LayerNorm, weight and merge channels-last grids; see the module docstring.

    Args:
        sources: S tensors of shape (B, h_i, w_i, C_i).
        out_hw: the target grid (H, W).
        groups: the output slot of each source; slots are numbered 0..G-1 and all sources of a slot
            share one width.
        layer_weights: S weights (a tensor, differentiable, or numbers).
        ln_weight, ln_bias: per source a (C_i,) affine parameter or None; None for no affine at all.
        mode: ``"bilinear"``, ``"nearest"`` or ``"area"``.
        eps: LayerNorm epsilon.
        normalize: LayerNorm each resampled source (True) or take it raw (False: no affine allowed).

    Returns:
        (B, H*W, sum of group widths) in the sources' dtype, slots in group order.

    Raises:
        ValueError: see :func:`check_grid_fuse_inputs`.
    """
    widths = check_grid_fuse_inputs(
        sources, out_hw, groups, layer_weights, ln_weight, ln_bias, mode, normalize
    )
    dtype = sources[0].dtype
    compute = torch.promote_types(dtype, torch.float32)
    weights = torch.as_tensor(layer_weights, device=sources[0].device)
    slots: list[torch.Tensor | None] = [None] * len(widths)
    for i, (g, x) in enumerate(zip(groups, sources)):
        aligned = resample(x.to(compute), out_hw, mode)
        if normalize:
            w = ln_weight[i] if ln_weight is not None else None
            b = ln_bias[i] if ln_bias is not None else None
            aligned = F.layer_norm(
                aligned,
                (aligned.shape[-1],),
                None if w is None else w.to(compute),
                None if b is None else b.to(compute),
                eps,
            )
        term = weights[i].to(compute) * aligned
        slots[g] = term if slots[g] is None else slots[g] + term
    out = torch.cat(slots, dim=-1)
    return out.reshape(out.shape[0], -1, out.shape[-1]).to(dtype)
