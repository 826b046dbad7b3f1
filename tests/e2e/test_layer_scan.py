"""experiment=layer_scan: one pass per encoder over the data, a probe per layer and task with its
interval, latency by depth, the recommended hooks, and the three files."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import encoder_fusion.benchmarks.features.cache as features
from encoder_fusion.benchmarks.run import run_benchmark
from encoder_fusion.benchmarks.run.layer_scan import encoder_depth, recommend

CONF = Path(__file__).resolve().parents[2] / "conf"

pytestmark = pytest.mark.slow


def make(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["experiment=layer_scan", "encoders=tiny", *overrides])


@pytest.mark.parametrize(("tasks", "pooled"), [("classification", True), ("all", False)])
def test_one_pass_per_encoder_and_a_row_per_layer(tmp_path, monkeypatch, tasks, pooled):
    passes = []
    original = features.FeatureCache._extract

    def counted(self, encoder, indices, load_images, *args, **kwargs):
        passes.append((encoder.spec.name, tuple(encoder.layer_indices), len(indices), kwargs.get("pool")))
        return original(self, encoder, indices, load_images, *args, **kwargs)

    monkeypatch.setattr(features.FeatureCache, "_extract", counted)
    path = run_benchmark(make(f"task={tasks}", f"bench.cache_dir={tmp_path / 'cache'}"), tmp_path / "out")
    assert path == tmp_path / "out" / "layer_scan.json"
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "layer_scan.json",
        "layer_scan.md",
        "layer_scan.png",
    ]
    scan = json.loads(path.read_text())
    # each encoder ran once over the train images and once over the test images, every block hooked
    assert sorted(passes) == sorted(
        (name, tuple(range(4)), count, pooled) for name in ("clip", "dino") for count in (48, 16)
    ), passes
    names = ["classification"] if tasks == "classification" else ["classification", "dense", "localization"]
    for name, encoder in scan["encoders"].items():
        assert encoder["depth"] == 4 and [row["layer"] for row in encoder["layers"]] == [0, 1, 2, 3]
        for row in encoder["layers"]:
            assert set(row["tasks"]) == set(names)
            for result in row["tasks"].values():
                low, high = result["ci"]
                assert 0 <= low <= result["mean"] <= high <= 1
            assert row["latency_ms"] > 0
        assert encoder["recommended"] == recommend(encoder["layers"], names), name
    assert scan["pooled"] is pooled
    text = (path.parent / "layer_scan.md").read_text()
    assert text.startswith("**RANDOM WEIGHTS") and "## clip (4 blocks): recommended hooks" in text


def row(layer, mean, low, high):
    return {"layer": layer, "tasks": {"t": {"mean": mean, "ci": [low, high]}}}


def test_recommend_the_best_and_the_shallowest_within_its_interval():
    layers = [
        row(0, 0.40, 0.3, 0.5),
        row(1, 0.61, 0.5, 0.7),
        row(2, 0.70, 0.6, 0.8),
        row(3, 0.65, 0.55, 0.75),
    ]
    assert recommend(layers, ["t"]) == [1, 2]  # best 2 (0.70); layer 1's 0.61 is above its lower bound 0.6
    assert recommend([row(0, 0.5, 0.4, 0.6)], ["t"]) == [0]
    assert recommend(layers, ["missing"]) == []


def test_an_encoder_without_a_depth_is_refused():
    spec = types.SimpleNamespace(name="odd", source="timm", model="resnet50")
    with pytest.raises(ValueError, match=r"cannot determine the depth of encoder 'odd' \(timm resnet50\)"):
        encoder_depth(types.SimpleNamespace(spec=spec, depth=None))
