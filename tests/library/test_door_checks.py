"""Sizes the machine cannot hold are refused at construction with the estimate in GB, and a feature
holding NaN or Inf is named by its encoder and hooked layer before it reaches the connector."""

from __future__ import annotations

import pytest
import torch

import encoder_fusion.memory
from encoder_fusion import EncoderGeometry, FusionHead
from encoder_fusion.align import build_aligner
from encoder_fusion.connector import build_connector
from encoder_fusion.kernels import NonFiniteError, finite_checks

GEOMETRIES = [
    EncoderGeometry("clip", 12, (5, 5), 2, (1, 3)),
    EncoderGeometry("dino", 20, (7, 7), 3, (2, 4, -1)),
]


def grids_of(geometries, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(3, *g.grid, g.width, generator=generator) for _ in range(g.num_layers)]
        for g in geometries
    ]


# -- memory --------------------------------------------------------------------------------------
def meminfo_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        line = next(line for line in meminfo if line.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


def test_available_bytes_is_the_hosts_free_memory():
    measured = encoder_fusion.memory.available_bytes("cpu")
    # read twice, around other processes' allocations: within 10 % of each other
    assert measured == pytest.approx(meminfo_available(), rel=0.1)


@pytest.fixture
def one_gb_free(monkeypatch):
    monkeypatch.setattr(encoder_fusion.memory, "available_bytes", lambda device="cpu": 10**9)


def test_a_connector_wider_than_memory_is_refused_with_its_estimate(one_gb_free):
    # 1000 x 500,000 float32 weights: 2.0 GB against 1.0 GB free
    with pytest.raises(
        ValueError, match=r"connector 1000 -> 500000 needs about 2\.0 GB, more than the 1\.0 GB free on cpu"
    ):
        build_connector({"kind": "mlp", "out_dim": 500_000}, 1000)
    assert build_connector({"kind": "mlp", "out_dim": 2000}, 1000).out_dim == 2000  # 8 MB fits


def test_a_million_wide_connector_is_refused_on_this_machine():
    # 16,384 x 1,000,000 float32 weights: 65.5 GB, more than this 24 GB machine has
    with pytest.raises(ValueError, match=r"connector 16384 -> 1000000 needs about 65\.5 GB, more than the"):
        build_connector({"kind": "mlp", "out_dim": 10**6}, 16384)


def test_a_huge_head_grid_is_refused_before_allocation(one_gb_free):
    # 100,000 x 100,000 cells x (12 x 2 + 20 x 3) channels x 4 bytes
    expected = 4 * 10**10 * (12 * 2 + 20 * 3) / 1e9
    with pytest.raises(
        ValueError, match=rf"grid 100000x100000 \(one image's aligned layers\) needs about {expected:,.1f} GB"
    ):
        FusionHead(GEOMETRIES, grid=[100_000, 100_000])
    FusionHead(GEOMETRIES, grid=[9, 11])  # an ordinary grid passes


def test_learned_queries_onto_a_huge_grid_are_refused(one_gb_free):
    # 4,000 x 4,000 queries x (64 channels + 8 heads x 49 keys) x 4 bytes = 29.2 GB
    with pytest.raises(ValueError, match=r"align 'learned' onto 4000x4000 .* needs about 29\.2 GB"):
        build_aligner("learned", 64, (7, 7), (4000, 4000))
    assert build_aligner("learned", 64, (7, 7), (6, 5)).out_grid == (6, 5)


# -- poisoned features ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("head", "fused_route"),
    [({}, True), ({"align": "learned"}, False), ({"merge_dim": 16}, False)],
    ids=["one grid_fuse call", "learned align", "merge_dim"],
)
@pytest.mark.parametrize(
    ("encoder", "index", "layer"), [(0, 1, 3), (1, 0, 2), (1, 2, -1)], ids=["clip 3", "dino 2", "dino -1"]
)
def test_a_non_finite_feature_is_named_by_encoder_and_layer(head, fused_route, encoder, index, layer):
    model = FusionHead(GEOMETRIES, grid=(6, 6), **head)
    assert model.fused_route is fused_route
    grids = grids_of(GEOMETRIES)
    grids[encoder][index][1, 2, 3, 4] = float("nan")
    name = GEOMETRIES[encoder].name
    with finite_checks(), pytest.raises(NonFiniteError) as caught:
        model(grids)
    assert str(caught.value).startswith(
        f"encoder {name!r}, hooked layer {layer} (HookSpec.layers[{index}]), holds NaN or Inf"
    )
    # the switch off (the library's default), the NaN is not looked for and reaches the tokens
    with finite_checks(False):
        assert not model(grids).isfinite().all()


def test_finite_features_pass_the_check_unchanged():
    model = FusionHead(GEOMETRIES, grid=(6, 6))
    grids = grids_of(GEOMETRIES, seed=3)
    with finite_checks():
        checked = model(grids)
    torch.testing.assert_close(checked, model(grids), rtol=0, atol=0)
