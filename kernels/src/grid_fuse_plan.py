"""How a ``grid_fuse`` call maps onto the Triton kernels: the token tiling (:class:`Tiles`,
:func:`default_tiles`), the checked :class:`Plan` of a call's
:class:`~encoder_fusion.kernels.grid_fuse_args.GridFuseArgs` (:func:`planned`), and the cache through
which a repeated call skips its checks and plan.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

from encoder_fusion.kernels.checks import check_grid_fuse_inputs
from encoder_fusion.kernels.grid_fuse_args import GridFuseArgs
from encoder_fusion.kernels.grid_fuse_jit import MODE_CODES

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One token's channels are held in registers; beyond this a row no longer fits one program.
MAX_CHANNELS = 16384

# Tile shapes. A forward tile holds _FORWARD_TILE elements whatever the dtype: every value is fp32
# once loaded, so a program's registers follow its element count, and how many bytes a
# multiprocessor keeps in flight follows how many programs fit beside each other. Elements per
# thread: 16 in the forward (one or two 16-byte loads per row and source) and in the backward rows
# kernel, 8 in the gather and parameter reductions. The rows kernel took 8 until the H100 tiling
# sweep of 2026-11-27 (benchmarks/results/grid_fuse_tiles_h100_2026-11-27.md): half the warps per
# tile ran forward + backward 1.11-1.55x faster at batch 128 and at CLIP-L batch 32.
_FORWARD_TILE = 2048
_MAX_BLOCK_T = 16
_FORWARD_ELEMENTS = 16
_BACKWARD_ROW_ELEMENTS = 16
BACKWARD_ELEMENTS = 8
# Backward rows programs per multiprocessor (4 fit at 1024 channels: 2 warps, 220-255 registers on
# sm_90), each walking at least MIN_TILES_PER_PROGRAM tiles so that the fp32 partial sums (one row
# per program and source) stay small next to the data when the batch is small.
_ROW_PROGRAMS_PER_SM = 4
MIN_TILES_PER_PROGRAM = 8
# Prefetching holds a second source's taps in registers; beyond this many channels (more than 32
# values per thread and tap) that spills, so wide groups load each source where it is used.
_PREFETCH_MAX_CHANNELS = 4096
_BLOCK_T_CHOICES = (1, 2, 4, 8, 16, 32, 64)
_WARP_CHOICES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Tiles:
    """How the kernels tile the tokens. :func:`default_tiles` picks one for a channel count;
    ``python -m encoder_fusion.benchmarks.kernel.tiles`` times others against it.

    Attributes:
        block_t: output tokens per forward program.
        num_warps: warps per forward program.
        prefetch: the forward and backward rows kernels issue the next source's loads before they
            reduce the current one (more bytes in flight, more registers).
        backward_block_t: tokens per tile of the backward rows kernel.
        backward_warps: warps per backward rows program.
        rows_per_sm: backward rows programs per multiprocessor (each walks a run of tiles).
    """

    block_t: int
    num_warps: int
    prefetch: bool
    backward_block_t: int
    backward_warps: int
    rows_per_sm: int

    def __post_init__(self) -> None:
        for name, accepted in (
            ("block_t", _BLOCK_T_CHOICES),
            ("num_warps", _WARP_CHOICES),
            ("backward_block_t", _BLOCK_T_CHOICES),
            ("backward_warps", _WARP_CHOICES),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in accepted:
                raise ValueError(f"Tiles.{name} must be one of {accepted}, got {value!r}")
        if not isinstance(self.prefetch, bool):
            raise ValueError(f"Tiles.prefetch must be a bool, got {self.prefetch!r}")
        if (
            isinstance(self.rows_per_sm, bool)
            or not isinstance(self.rows_per_sm, int)
            or self.rows_per_sm < 1
        ):
            raise ValueError(f"Tiles.rows_per_sm must be an int >= 1, got {self.rows_per_sm!r}")


def warps_for(elements: int, per_thread: int = _FORWARD_ELEMENTS) -> int:
    """Warps for a tile of ``elements`` values: about ``per_thread`` each, between 1 and 16 warps."""
    return max(1, min(16, elements // (32 * per_thread)))


def default_tiles(channels: int) -> Tiles:
    """The tiles for groups of at most ``channels`` channels (any dtype)."""
    block_c = triton.next_power_of_2(channels)
    block_t = max(1, min(_MAX_BLOCK_T, _FORWARD_TILE // block_c))
    backward_block_t = max(1, block_t // 2)
    return Tiles(
        block_t=block_t,
        num_warps=warps_for(block_t * block_c),
        prefetch=block_c <= _PREFETCH_MAX_CHANNELS,
        backward_block_t=backward_block_t,
        backward_warps=min(8, warps_for(backward_block_t * block_c, _BACKWARD_ROW_ELEMENTS)),
        rows_per_sm=_ROW_PROGRAMS_PER_SM,
    )


@dataclass(frozen=True)
class Plan:
    """How one ``grid_fuse`` call maps onto the kernels (everything but the tensors).

    Slots are the sources sorted by group (stable); the kernels visit groups in order and the
    sources of a group in slot order, so a per-slot tuple lines up with that visit order. Each
    kernel's compile-time arguments are planned here, but those that vary between calls of one
    signature (which outputs a call wants).
    """

    out_hw: tuple[int, int]
    source_of: tuple[int, ...]  # slot -> source index
    widths: tuple[int, ...]  # per group
    columns: tuple[int, ...]  # first output column per group
    identity: int  # bit k: slot k already has the target grid
    normalize: bool  # LayerNorm the sources (else they are summed raw)
    block_c: int  # channels of a tile: the widest group, rounded up to a power of two
    tiles: Tiles
    forward: dict[str, object]  # of the forward kernel, but STORE_STATS
    backward_rows: dict[str, object]  # of the backward rows kernel, but NEED_DR and NEED_PARAMS
    param_grads: dict[str, object]  # of the parameter reduction, but BLOCK_R and num_warps
    gather: dict[str, object]  # of the backward gather kernel


def bits(flags: Sequence[bool]) -> int:
    """The flags as a bit mask (bit k: flag k), the form the kernels take per-slot flags in."""
    return sum(1 << k for k, flag in enumerate(flags) if flag)


def _check_kernel_inputs(sources: Sequence[torch.Tensor], widths: Sequence[int]) -> None:
    """What the kernels take beyond what every path accepts: their dtypes and channel limit."""
    dtype = sources[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        accepted = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise ValueError(
            f"grid_fuse (triton) sources have dtype {dtype}; accepted: {accepted} "
            "(use the reference for others)"
        )
    for g, width in enumerate(widths):
        if width > MAX_CHANNELS:
            raise ValueError(
                f"grid_fuse (triton) group {g} has {width} channels; at most {MAX_CHANNELS} are supported"
            )


def _make_plan(args: GridFuseArgs, tiles: Tiles | None) -> Plan:
    """Check a call's signature and plan it; ``tiles`` None takes :func:`default_tiles`."""
    widths = check_grid_fuse_inputs(args)
    sources, groups, ln_weight, ln_bias = args.sources, args.groups, args.ln_weight, args.ln_bias
    _check_kernel_inputs(sources, widths)
    if tiles is not None and not isinstance(tiles, Tiles):
        raise ValueError(
            f"grid_fuse tiles must be an encoder_fusion.kernels.grid_fuse_plan.Tiles or None, "
            f"got {type(tiles).__name__}"
        )
    source_of = tuple(sorted(range(len(sources)), key=groups.__getitem__))
    out_hw = (int(args.out_hw[0]), int(args.out_hw[1]))
    block_c = triton.next_power_of_2(max(widths))
    tiles = tiles or default_tiles(block_c)
    group_of = tuple(groups[i] for i in source_of)
    identity = bits([tuple(sources[i].shape[1:3]) == out_hw for i in source_of])
    has_weight = bits([ln_weight is not None and ln_weight[i] is not None for i in source_of])
    has_bias = bits([ln_bias is not None and ln_bias[i] is not None for i in source_of])
    mode = MODE_CODES[args.mode]
    # what the kernels share; each adds its own
    slots = dict(GROUP_OF=group_of, SOURCE_OF=source_of, HAS_W=has_weight, BLOCK_C=block_c)
    tokens = dict(slots, IDENTITY=identity, MODE=mode, NORMALIZE=args.normalize, PREFETCH=tiles.prefetch)
    first_slot = tuple(group_of.index(g) for g in range(len(widths)))
    return Plan(
        out_hw=out_hw,
        source_of=source_of,
        widths=tuple(widths),
        columns=tuple(itertools.accumulate(widths, initial=0))[:-1],
        identity=identity,
        normalize=args.normalize,
        block_c=block_c,
        tiles=tiles,
        forward=dict(tokens, HAS_B=has_bias, BLOCK_T=tiles.block_t, num_warps=tiles.num_warps),
        backward_rows=dict(
            tokens, FIRST_SLOT=first_slot, BLOCK_T=tiles.backward_block_t, num_warps=tiles.backward_warps
        ),
        param_grads=dict(slots, HAS_B=has_bias),
        gather=dict(MODE=mode, BLOCK_C=block_c, num_warps=warps_for(block_c, BACKWARD_ELEMENTS)),
    )


# Plans of recent calls by call signature. A repeated call (one model, fixed shapes: the common
# case) skips the signature checks and the plan, which halves its host time: 52-54 us instead of
# 103-109 us per inference call at the built-in shapes, bf16 and fp32, on a 2-core x86 CPU
# (2026-12-03), from `python -m encoder_fusion.benchmarks.kernel.host --calls 300` (launches stubbed; the rows
# "inference" and "inference, plan rebuilt").
_PLAN_CACHE: OrderedDict[tuple, Plan] = OrderedDict()
_PLAN_CACHE_SIZE = 64


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.shape, t.stride(), t.dtype, t.device)


def _call_key(args: GridFuseArgs, tiles: Tiles | None) -> tuple | None:
    """A summary of everything the signature checks and the plan read (shapes, strides, dtypes,
    devices, the types and values of sizes and groups), hashable unless an argument holds an
    unhashable value; None for arguments of a kind only the full checks handle, which then accept
    them or raise."""

    def params_key(params: Sequence[torch.Tensor | None] | None) -> tuple | None:
        # the container's type too: a (1, C) tensor iterates like a list of one (C,) tensor
        if params is None:
            return None
        return (type(params), *(None if p is None else _tensor_key(p) for p in params))

    layer_weights = args.layer_weights
    try:
        if isinstance(layer_weights, torch.Tensor):
            weights_key = _tensor_key(layer_weights)
        else:
            weights_key = ("values", *map(type, layer_weights))
        key = (
            tuple(_tensor_key(x) for x in args.sources),
            tuple((type(v), v) for v in args.out_hw),
            tuple((type(g), g) for g in args.groups),
            weights_key,
            params_key(args.ln_weight),
            params_key(args.ln_bias),
            (type(args.mode), args.mode),
            (type(args.normalize), args.normalize),
            tiles,
        )
    except (AttributeError, TypeError):  # not tensors / not sequences: full checks
        return None
    return key


def planned(args: GridFuseArgs, tiles: Tiles | None) -> Plan:
    """The checked plan of a call: :func:`encoder_fusion.kernels.checks.check_grid_fuse_inputs`, the kernels'
    own limits (dtype, :data:`MAX_CHANNELS`) and ``tiles`` (:func:`default_tiles` if None); from the
    cache when a call of the same signature passed before.

    Raises:
        ValueError: naming the argument, the value and what is accepted.
    """
    key = _call_key(args, tiles)
    try:  # the lookup is the one hash of the key (hashing a key costs as much as a third of it)
        plan = None if key is None else _PLAN_CACHE.get(key)
    except TypeError:  # an unhashable value (a list inside groups, say): full checks, no entry
        key = plan = None
    if plan is None:
        plan = _make_plan(args, tiles)
        if key is not None:
            _PLAN_CACHE[key] = plan
            while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
                _PLAN_CACHE.popitem(last=False)  # the oldest entry (one C call: safe across threads)
    return plan


def clear_plan_cache() -> None:
    """Forget every cached plan, so the next call of each signature is checked and planned again
    (``encoder_fusion.benchmarks.kernel.host`` times calls this way)."""
    _PLAN_CACHE.clear()
