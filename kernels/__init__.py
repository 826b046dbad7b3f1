"""Fusion kernels: ``grid_fuse`` (align + LayerNorm + weight + merge in one pass).

``kernels.reference`` holds the PyTorch definitions; this package dispatches to them.
"""

from kernels.reference import MODES, grid_fuse

__all__ = ["MODES", "grid_fuse"]
