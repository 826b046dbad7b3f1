"""The arguments of one ``grid_fuse`` call as one type, :class:`GridFuseArgs`, and
:func:`grid_fuse_face`, which gives a function of one :class:`GridFuseArgs` the public signature::

    grid_fuse(sources, out_hw, *, groups, layer_weights, ln_weight=None, ln_bias=None,
              mode="bilinear", eps=1e-6, normalize=True)

The public entries (``encoder_fusion.kernels.grid_fuse``, ``encoder_fusion.kernels.reference.grid_fuse``,
``encoder_fusion.kernels.grid_fuse_triton.triton_grid_fuse``) build the arguments once; the reference,
the checks, the plan and the host functions of the Triton path all take them as they are.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import ParamSpec

import torch

_P = ParamSpec("_P")


# eq=False: the fields hold tensors, whose == is elementwise; one call's arguments equal only themselves.
# slots: built on every call, and a slotted instance is quicker to build.
@dataclass(frozen=True, eq=False, slots=True)
class GridFuseArgs:
    """The arguments of one ``grid_fuse`` call, as given (:mod:`encoder_fusion.kernels.checks`
    validates them).

    Attributes:
        sources: S tensors of shape (B, h_i, w_i, C_i).
        out_hw: the target grid (H, W).
        groups: the output slot of each source; slots are numbered 0..G-1 and all sources of a slot
            share one width.
        layer_weights: S weights (a tensor, differentiable, or numbers).
        ln_weight, ln_bias: per source a (C_i,) affine parameter or None; None for no affine at all.
        mode: ``"bilinear"``, ``"nearest"`` or ``"area"``.
        eps: LayerNorm epsilon.
        normalize: LayerNorm each resampled source (True) or take it raw (False: no affine allowed).
    """

    sources: Sequence[torch.Tensor]
    out_hw: Sequence[int]
    _: KW_ONLY
    groups: Sequence[int]
    layer_weights: torch.Tensor | Sequence[float]
    ln_weight: Sequence[torch.Tensor | None] | None = None
    ln_bias: Sequence[torch.Tensor | None] | None = None
    mode: str = "bilinear"
    eps: float = 1e-6
    normalize: bool = True


def _with_signature_of(
    build: Callable[_P, GridFuseArgs],
) -> Callable[[Callable[[GridFuseArgs], torch.Tensor]], Callable[_P, torch.Tensor]]:
    """The decorator that gives a function of one :class:`GridFuseArgs` the signature of ``build``."""

    def decorate(fuse: Callable[[GridFuseArgs], torch.Tensor]) -> Callable[_P, torch.Tensor]:
        """The face of ``fuse``: it takes the arguments of a ``grid_fuse`` call, builds one
        :class:`GridFuseArgs` of them (as given, unchecked) and returns ``fuse`` of it; it keeps
        ``fuse``'s name and docstring and shows the public signature (``help``, ``inspect``)."""

        @functools.wraps(fuse)
        def face(*args: _P.args, **kwargs: _P.kwargs) -> torch.Tensor:
            return fuse(build(*args, **kwargs))

        returns = inspect.signature(fuse).return_annotation
        signature = inspect.signature(build).replace(return_annotation=returns)
        # what help() and inspect show; a function takes any attribute, which the checker does not know
        face.__signature__ = signature  # pyright: ignore[reportAttributeAccessIssue]
        return face

    return decorate


# Decorates ``def grid_fuse(args: GridFuseArgs) -> torch.Tensor`` into the public face.
grid_fuse_face = _with_signature_of(GridFuseArgs)
