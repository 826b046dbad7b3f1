"""The house rules of ``kernels/`` (``encoder_fusion.kernels``): it imports only torch, triton, the
standard library and itself, and no file of it is over 600 lines."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels" / "src"
ITSELF = "encoder_fusion.kernels"
FILES = sorted(KERNELS.glob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_imports_only_torch_triton_and_the_standard_library(path):
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    own = {name for name in names if name == ITSELF or name.startswith(ITSELF + ".")}
    outside = {name.split(".")[0] for name in names - own} - {"torch", "triton"} - sys.stdlib_module_names
    assert outside == set(), f"{path.name} imports {sorted(outside)}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_file_is_over_600_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 600, f"{path.name} has {lines} lines"
