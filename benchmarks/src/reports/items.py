"""Per-item results beside a run's report (``items.safetensors``), for what needs the items after the
run: a sweep's aggregate ranks the strategies of all its jobs with intervals over the same items.

Each (strategy, task) keeps its per-item statistics of every seed (``(seeds, items, k)``, float64);
the report itself stays small. Jobs pair item by item only when they read the same test items: the
same data settings, seed and probe seeds (:func:`pairing_key`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from encoder_fusion.io import atomic_write

ITEMS_FILE = "items.safetensors"


def write_items(out_dir: str | os.PathLike, items: Mapping[tuple[str, str], torch.Tensor]) -> Path:
    """Write ``(strategy, task) -> per-item statistics`` into ``out_dir`` atomically."""
    from safetensors.torch import save

    names = {str(i): list(key) for i, key in enumerate(items)}
    tensors = {str(i): value.to(torch.float64).contiguous() for i, value in enumerate(items.values())}
    data = save(tensors, metadata={"keys": json.dumps(names)})
    return atomic_write(Path(out_dir) / ITEMS_FILE, data)


def read_items(folder: str | os.PathLike) -> dict[tuple[str, str], torch.Tensor]:
    """The per-item statistics a run wrote into ``folder``; ``{}`` when it wrote none (a run older
    than this file) or the file cannot be read (the aggregate then ranks without that job)."""
    path = Path(folder) / ITEMS_FILE
    if not path.is_file():
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            names = json.loads((handle.metadata() or {})["keys"])
            return {(strategy, task): handle.get_tensor(i) for i, (strategy, task) in names.items()}
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return {}


def pairing_key(run: Mapping[str, Any]) -> str:
    """What must be equal for two runs' items to be the same test items: data, seed, probe seeds."""
    task = run.get("task") or {}
    return json.dumps([run.get("data"), run.get("seed"), task.get("seeds")], sort_keys=True, default=str)
