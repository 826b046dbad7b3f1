"""An image that cannot be used (truncated, not an image, too large) stops the run before any encoder
runs, naming its file, wherever it is in the splits; ``data.on_bad_image=skip`` leaves it out
instead, and the report counts and names what it left out."""

from __future__ import annotations

import io
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_runs import CONF, smoke_config
from hydra import compose, initialize_config_dir
from PIL import Image

from encoder_fusion.benchmarks.config.plan import build_datasets
from encoder_fusion.benchmarks.datasets import build_dataset, load_batch, load_split
from encoder_fusion.benchmarks.reports.aggregate import skipped_images
from encoder_fusion.benchmarks.reports.render import skipped_lines
from encoder_fusion.benchmarks.reports.report import load_report
from encoder_fusion.benchmarks.run import run_benchmark
from encoder_fusion.encoders import Encoder
from encoder_fusion.images import BadImageError


def write_folder(root: Path, per_class: int = 6) -> Path:
    """An ImageFolder of two classes of random JPEGs of awkward sizes."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (21 + i, 27, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)
    return root


def truncate(path: Path) -> None:
    """Cut a JPEG to half its bytes, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_stop_names_the_file_and_skip_leaves_it_out(tmp_path):
    root = write_folder(tmp_path / "folder")
    dataset = build_dataset("imagefolder", root)
    bad = dataset.records[3].image
    truncate(bad)
    (root / "dog" / "2.jpg").write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match=rf"image file {bad} cannot be read as an image"):
        load_split(dataset, 16)
    kept, batch, skipped = load_split(dataset, 16, "skip")
    assert [item["file"] for item in skipped] == [str(bad), str(root / "dog" / "2.jpg")]
    assert all(item["file"] in item["error"] for item in skipped)
    good = [i for i, r in enumerate(dataset.records) if str(r.image) not in {s["file"] for s in skipped}]
    assert len(kept) == len(good) == len(dataset) - 2
    assert [r.image for r in kept.records] == [dataset.records[i].image for i in good]
    want = load_batch(dataset, good, 16)  # the batch of the good images alone, decoded on its own
    assert torch.equal(batch["images"], want["images"]) and torch.equal(batch["labels"], want["labels"])


def test_nothing_kept_and_unknown_choices_are_refused(tmp_path):
    root = write_folder(tmp_path / "folder", per_class=1)
    dataset = build_dataset("imagefolder", root)
    for record in dataset.records:
        truncate(record.image)
    with pytest.raises(ValueError, match=r"every one of the 2 images of imagefolder .* was skipped"):
        load_split(dataset, 16, "skip")
    with pytest.raises(ValueError, match=r"on_bad_image='ignore' is unknown; accepted: stop, skip"):
        load_split(dataset, 16, "ignore")
    with pytest.raises(ValueError, match=r"image_size must be a positive int, got 0"):
        load_split(dataset, 0, "skip")


def test_a_too_large_image_is_skipped_like_an_unreadable_one(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "folder", per_class=2)
    monkeypatch.setenv("FUSION_MAX_IMAGE_PIXELS", str(21 * 27 + 1))  # only the first of each class fits
    kept, _, skipped = load_split(build_dataset("imagefolder", root), 16, "skip")
    assert len(kept) == 2 and len(skipped) == 2
    assert all("FUSION_MAX_IMAGE_PIXELS" in item["error"] for item in skipped)


@pytest.fixture
def forwards(monkeypatch) -> list[int]:
    """The images every encoder forward got, in order."""
    seen: list[int] = []
    original = Encoder.forward_tokens

    def counted(self, images, *args, **kwargs):
        seen.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Encoder, "forward_tokens", counted)
    return seen


def test_a_bad_image_in_the_test_split_stops_the_run_before_any_extraction(tmp_path, forwards):
    root, cache = write_folder(tmp_path / "folder"), tmp_path / "cache"
    cfg = smoke_config("data=imagefolder", f"data.root={root}", "data.limit=null", f"bench.cache_dir={cache}")
    _, test = build_datasets(cfg)
    bad = test.records[-1].image  # the last image the run decodes: the train split comes first
    truncate(bad)
    with pytest.raises(BadImageError, match=rf"image file {bad} cannot be read"):
        run_benchmark(cfg, tmp_path / "run")
    assert forwards == []  # no encoder ran on the train split first
    assert not cache.exists() or not any(cache.glob("*/manifest.json"))


def test_skip_runs_on_and_the_report_counts_and_names_what_it_left_out(tmp_path):
    root = write_folder(tmp_path / "folder")
    overrides = ["data=imagefolder", f"data.root={root}", "data.limit=null", "task.names=[classification]"]
    cfg = smoke_config(*overrides, f"bench.cache_dir={tmp_path / 'cache'}", "data.on_bad_image=skip")
    train, test = build_datasets(cfg)
    bad = test.records[0].image
    truncate(bad)
    path = run_benchmark(cfg, tmp_path / "run")
    report = load_report(path)
    assert report.run["data_sizes"] == {"train": len(train), "test": len(test) - 1}
    assert report.run["skipped_images"]["train"] == []
    [skipped] = report.run["skipped_images"]["test"]
    assert skipped["file"] == str(bad) and str(bad) in skipped["error"]
    markdown = (path.parent / "report.md").read_text()
    assert "1 of the test split" in markdown and str(bad) in markdown


def test_skipped_lines_count_per_split_and_cap_the_list():
    skipped = {
        "train": [{"file": f"t{i}.jpg", "error": f"image file t{i}.jpg cannot be read"} for i in range(3)],
        "test": [],
    }
    lines = skipped_lines(skipped, shown=2)
    assert lines[:3] == [
        "## Skipped images",
        "",
        "Left out as unusable (data.on_bad_image=skip): 3 of the train split.",
    ]
    assert lines[4:] == [
        "- train: image file t0.jpg cannot be read",
        "- train: image file t1.jpg cannot be read",
        "- and 1 more (the JSON report lists them all)",
    ]
    assert skipped_lines({"train": [], "test": []}) == [] and skipped_lines(None) == []


def test_a_truncated_jpeg_is_truncated(tmp_path):
    """The fixture's premise, checked against Pillow itself: the cut file does not decode."""
    path = tmp_path / "a.jpg"
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(path)
    truncate(path)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(path.read_bytes())).load()


def test_the_layer_scan_skips_and_names_the_same_way(tmp_path):
    root = write_folder(tmp_path / "folder")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=layer_scan",
                "encoders=tiny",
                "task=classification",
                "data=imagefolder",
                f"data.root={root}",
                "data.limit=null",
                "data.on_bad_image=skip",
                f"bench.cache_dir={tmp_path / 'cache'}",
            ],
        )
    train, _ = build_datasets(cfg)
    bad = train.records[1].image
    truncate(bad)
    path = run_benchmark(cfg, tmp_path / "scan")
    scan = json.loads(path.read_text())
    assert [item["file"] for item in scan["skipped_images"]["train"]] == [str(bad)]
    assert scan["skipped_images"]["test"] == []
    markdown = (path.parent / "layer_scan.md").read_text()
    assert "## Skipped images" in markdown and "1 of the train split" in markdown and str(bad) in markdown


def test_a_sweeps_aggregate_lists_each_skipped_file_once():
    item = {"file": "a.jpg", "error": "image file a.jpg cannot be read as an image"}
    other = {"file": "b.jpg", "error": "image file b.jpg cannot be read as an image"}
    jobs = [
        types.SimpleNamespace(run={"skipped_images": {"train": [item], "test": []}}),
        types.SimpleNamespace(run={"skipped_images": {"train": [item, other], "test": []}}),
        types.SimpleNamespace(run={}),  # a report written before images could be skipped
    ]
    assert skipped_images(jobs) == {"train": [item, other], "test": []}
