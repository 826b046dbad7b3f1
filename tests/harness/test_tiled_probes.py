"""The probes read tiled images as the tiled model does: the stacked region grids of the feature cache,
through :class:`TiledHead`, give the tokens of :class:`FusedEncoder` with the same tiling (separators
and DeepStack sets included); the dense grid places each tile where it was cut; a tiled run probes
every task on its tiles, caching them as images of their own."""

from __future__ import annotations

import json

import pytest
import torch
from bench_runs import CONF
from hydra import compose, initialize_config_dir

from encoder_fusion import FusedEncoder
from encoder_fusion.benchmarks.features.tiles import TiledHead, stack_regions
from encoder_fusion.benchmarks.reports.report import load_report
from encoder_fusion.benchmarks.run import run_benchmark
from encoder_fusion.encoders import build_encoder
from encoder_fusion.encoders.tiny import tiny_spec
from encoder_fusion.tiling import TilingSpec, cut_tiles


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return [build_encoder(tiny_spec("clip", layers=[-2, -1])), build_encoder(tiny_spec("dino", layers=[-1]))]


def region_grids(
    model: FusedEncoder, images: torch.Tensor, spec: TilingSpec, grid
) -> list[list[torch.Tensor]]:
    """What the feature cache gives a tiled probe: each encoder's grids of the tiles and of the whole
    images, stacked per image."""
    tiles = model.extract(cut_tiles(images, grid))
    whole = model.extract(images) if spec.thumbnail != "none" else None
    return [
        [stack_regions(t, None if whole is None else whole[e][i], grid) for i, t in enumerate(layers)]
        for e, layers in enumerate(tiles)
    ]


@torch.no_grad()
@pytest.mark.parametrize(("thumbnail", "newline"), [("last", False), ("first", True), ("none", True)])
def test_the_tiled_head_gives_the_tiled_models_tokens(encoders, thumbnail, newline):
    spec = TilingSpec(grid=(2, 3), thumbnail=thumbnail, newline=newline)
    torch.manual_seed(1)
    model = FusedEncoder(
        encoders,
        grid=3,
        connector={"kind": "mlp", "out_dim": 20},
        tiling=spec,
        deepstack_layers={"clip": [-2]},
    ).eval()
    images = torch.rand(3, 3, 70, 99, generator=torch.Generator().manual_seed(2))  # 35 x 33 tiles
    expected, expected_sets = model.forward_deepstack(images)
    head = TiledHead(model.head, spec, (2, 3))
    if newline:
        head.tiler.newline.copy_(model.tiler.newline)
    tokens, sets = head.forward_deepstack(region_grids(model, images, spec, (2, 3)))
    assert tokens.shape == expected.shape == (3, head.output_tokens, 20)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sets[0], expected_sets[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        head(region_grids(model, images, spec, (2, 3))), expected, rtol=1e-5, atol=1e-5
    )


@torch.no_grad()
@pytest.mark.parametrize("thumbnail", ["first", "last"])
def test_the_dense_grid_places_each_tile_where_it_was_cut(encoders, thumbnail):
    spec = TilingSpec(grid=(3, 2), thumbnail=thumbnail, newline=True)
    torch.manual_seed(3)
    model = FusedEncoder(encoders, grid=4, connector={"kind": "linear", "out_dim": 8}, tiling=spec).eval()
    images = torch.rand(2, 3, 66, 64, generator=torch.Generator().manual_seed(4))
    head = TiledHead(model.head, spec, (3, 2))
    placed = head.to_grid(head(region_grids(model, images, spec, (3, 2))))
    assert placed.shape == (2, 12, 8, 8)
    for r in range(3):
        for c in range(2):
            region = images[:, :, 22 * r : 22 * (r + 1), 32 * c : 32 * (c + 1)]
            alone = model.head.to_grid(model.head(model.extract(region)))
            torch.testing.assert_close(
                placed[:, 4 * r : 4 * (r + 1), 4 * c : 4 * (c + 1)], alone, rtol=1e-5, atol=1e-5
            )


def test_a_tiled_run_probes_every_task_on_its_tiles(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=smoke",
                "tiling=2x2",
                "task.names=[classification,dense,localization,knn,vlm]",
                f"bench.cache_dir={tmp_path / 'cache'}",
            ],
        )
    report = load_report(run_benchmark(cfg, tmp_path / "run"))
    for record in report.strategies:
        assert not record.errors, record.errors
        assert set(record.accuracy) == {"classification", "dense", "localization", "knn", "vlm"}
        assert all(result.mean is not None for result in record.accuracy.values())
    # every encoder's tiles are cached beside its whole images: four rows per image for the 2x2 tiles
    rows = {}
    for manifest in (tmp_path / "cache").glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        rows.setdefault("tiles" in json.dumps(data["key"]), []).append(sum(s["rows"] for s in data["shards"]))
    assert rows[True] and sorted(rows[True]) == sorted(4 * n for n in rows[False])
