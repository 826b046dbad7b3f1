"""The report of what the feature cache's content key costs beside decoding the same images
(benchmarks.features.content_key_cost)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoder_fusion.benchmarks.features import content_key_cost
from encoder_fusion.benchmarks.features.fingerprint import BLOCK


def write_images(folder: Path) -> list[Path]:
    """Five small PNGs and one JPEG larger than the quick key's two end blocks, in a subfolder."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    paths = []
    for i in range(5):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (9 + i, 13, 3), dtype=np.uint8)).save(paths[-1])
    paths.append(folder / "sub" / "big.jpg")
    Image.fromarray(rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)).save(paths[-1], quality=100)
    (folder / "notes.txt").write_text("not an image")
    return paths


def test_the_cost_report_times_the_three_passes_side_by_side(tmp_path, capsys):
    paths = write_images(tmp_path / "images")
    assert paths[-1].stat().st_size > 2 * BLOCK
    out = tmp_path / "cost.json"
    content_key_cost.main(["--folder", str(tmp_path / "images"), "--rounds", "3", "--out", str(out)])
    report = json.loads(out.read_text())
    [row] = report["rows"]
    assert row["files"] == 6 and row["bytes"] == sum(p.stat().st_size for p in paths)
    for name in ("full", "quick"):
        assert row[f"{name}_x_decode"] == pytest.approx(row[f"{name}_s"] / row["decode_s"])
        low, high = row[f"{name}_x_decode_ci"]
        assert 0 < low <= high
    assert row["full_s_per_gb"] == pytest.approx(row["full_s"] / (row["bytes"] / 1e9))
    printed = capsys.readouterr().out
    assert printed == out.with_suffix(".md").read_text()
    assert printed.startswith("# The feature cache's content key against decoding the same images")


def test_the_default_measures_what_a_run_of_each_dataset_hashes(datasets_root, monkeypatch):
    monkeypatch.setenv("FUSION_DATA", str(datasets_root))
    coco = content_key_cost.dataset_images("coco128")
    # both splits' images, not the masks beside them
    assert len(coco) == len(set(coco)) and all("/images/" in str(p) for p in coco)
    assert {p.parent.name for p in coco} == {"train2017", "val2017"}


def test_bad_arguments_are_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    for argv, message in (
        (["--rounds", "2", "--folder", str(tmp_path)], "--rounds must be at least 3, got 2"),
        (["--folder", str(tmp_path / "empty")], f"--folder {tmp_path / 'empty'} holds no image file"),
    ):
        with pytest.raises(SystemExit) as caught:
            content_key_cost.main(argv)
        assert caught.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.delenv("FUSION_DATA", raising=False)
    with pytest.raises(SystemExit):
        content_key_cost.main([])
    assert "give --folder, or set FUSION_DATA" in capsys.readouterr().err
