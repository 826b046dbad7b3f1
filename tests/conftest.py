"""Shared test settings: offline hubs, a fixed thread count, and the path of the real datasets."""

import os
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter. Triton reads this when a kernel is
# decorated, so it must be set before anything imports triton (torch, timm and kernels may).
# Set TRITON_INTERPRET=0 to test the compiled kernels on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never reach a model hub; the loaders must take their offline paths.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    """``$FUSION_DATA``, else ``../shared/datasets`` beside the repository; skips when absent."""
    root = Path(os.environ.get("FUSION_DATA", REPO.parent / "shared" / "datasets"))
    if not root.is_dir():
        pytest.skip(f"real datasets not found at {root}; set FUSION_DATA")
    return root


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache that the loaders read instead of the real one."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache
