"""Datasets: every format loads, the generated one is deterministic, every documented error is raised."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from encoder_fusion.benchmarks.datasets import (
    DATASETS,
    IGNORE_INDEX,
    SHAPES,
    balanced_subset,
    build_dataset,
    build_train_test,
    load_batch,
    stratified_split,
)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def random_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# -- synthetic -------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_consistent():
    first = build_dataset("synthetic", num_images=30, image_size=40, seed=3)
    again = build_dataset("synthetic", num_images=30, image_size=40, seed=3)
    other = build_dataset("synthetic", num_images=30, image_size=40, seed=4)
    assert first.classes == list(SHAPES) and first.mask_classes == ["background", *SHAPES]
    differs = 0
    for index in range(len(first)):
        a, b, c = first[index], again[index], other[index]
        assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and torch.equal(a.box, b.box)
        differs += not torch.equal(a.image, c.image)
        assert a.image.shape == (3, 40, 40) and a.image.dtype == torch.uint8
        assert a.mask.shape == (40, 40) and a.mask.dtype == torch.int64
        # the mask holds background and exactly the labelled shape
        assert set(a.mask.unique().tolist()) == {0, a.label + 1}
        # the box is the tight box of the shape's pixels, computed here independently
        ys, xs = torch.nonzero(a.mask > 0, as_tuple=True)
        expected = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32) / 40
        torch.testing.assert_close(a.box, expected)
        # the shape is painted: its pixels differ in colour from the background on average
        inside, outside = a.mask > 0, a.mask == 0
        gap = (a.image[:, inside].float().mean(1) - a.image[:, outside].float().mean(1)).abs().sum()
        assert gap > 20
    assert differs == len(first)
    counts = collections.Counter(first.labels)
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == len(SHAPES)


def test_synthetic_subset_is_the_same_images():
    full = build_dataset("synthetic", num_images=48, image_size=32, seed=1)
    part = build_dataset("synthetic", num_images=48, image_size=32, seed=1, limit=12)
    keys = [r.key for r in full.records]
    for index, record in enumerate(part.records):
        assert torch.equal(part[index].image, full[keys.index(record.key)].image)
    counts = collections.Counter(part.labels)
    assert sum(counts.values()) == 12 and max(counts.values()) - min(counts.values()) <= 1


def test_synthetic_options_are_checked():
    with pytest.raises(ValueError, match="num_images"):
        build_dataset("synthetic", num_images=0)
    with pytest.raises(ValueError, match="image_size"):
        build_dataset("synthetic", image_size=8)
    with pytest.raises(ValueError, match="hexagon"):
        build_dataset("synthetic", shapes=["circle", "hexagon"])
    with pytest.raises(ValueError, match=r"unknown option.*colour.*accepted: num_images"):
        build_dataset("synthetic", colour="red")
    with pytest.raises(ValueError, match="split='train' is unknown"):
        build_dataset("synthetic", split="train")


# -- imagefolder -----------------------------------------------------------------------------------
@pytest.fixture
def image_tree(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for name, sizes in {
        "zebra": [(20, 30), (33, 17)],
        "ant": [(25, 25)],
        "moth": [(18, 40), (40, 18), (9, 9)],
    }.items():
        for i, (h, w) in enumerate(sizes):
            array = random_rgb(rng, h, w)
            write_png(tmp_path / "tree" / name / f"img{i}.png", array)
            written[(name, f"img{i}.png")] = array
    (tmp_path / "tree" / "ant" / "notes.txt").write_text("not an image")
    return tmp_path / "tree", written


def test_imagefolder_loads_tree(image_tree):
    root, written = image_tree
    dataset = build_dataset("imagefolder", root)
    assert dataset.classes == ["ant", "moth", "zebra"]
    assert len(dataset) == 6 and dataset.mask_classes is None
    for index, record in enumerate(dataset.records):
        name, file = record.key.split("/")
        sample = dataset[index]
        assert sample.label == dataset.classes.index(name) and sample.mask is None and sample.box is None
        assert torch.equal(sample.image, torch.from_numpy(written[(name, file)]).permute(2, 0, 1))


def test_imagefolder_split_subfolder(image_tree, tmp_path):
    root, _ = image_tree
    (tmp_path / "splits").mkdir()
    root.rename(tmp_path / "splits" / "train")
    assert len(build_dataset("imagefolder", tmp_path / "splits", split="train")) == 6
    with pytest.raises(FileNotFoundError, match=r"split 'val'.*splits/val"):
        build_dataset("imagefolder", tmp_path / "splits", split="val")


def test_imagefolder_errors(image_tree, tmp_path):
    root, _ = image_tree
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("imagefolder", tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    write_png(tmp_path / "flat" / "a.png", random_rgb(np.random.default_rng(1), 8, 8))
    with pytest.raises(ValueError, match="no class subfolders"):
        build_dataset("imagefolder", tmp_path / "flat")
    (root / "empty").mkdir()
    (root / "empty" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match=r"class folder .*empty holds no images"):
        build_dataset("imagefolder", root)
    (root / "empty" / "broken.jpg").write_bytes(b"this is not a jpeg")
    dataset = build_dataset("imagefolder", root)
    broken = [r.key for r in dataset.records].index("empty/broken.jpg")
    with pytest.raises(ValueError, match=r"broken\.jpg cannot be read as an image"):
        dataset[broken]


# -- Tiny-ImageNet ---------------------------------------------------------------------------------
def test_tinyimagenet_real_subset(datasets_root):
    dataset = build_dataset("tinyimagenet", datasets_root, limit=30, seed=2)
    folder = datasets_root / "tiny-imagenet-200-val"
    wnids = (folder / "wnids.txt").read_text().split()
    rows = {
        line.split("\t")[0]: line.split("\t")[1:]
        for line in (folder / "val" / "val_annotations.txt").read_text().splitlines()
    }
    assert dataset.num_classes == 200 and len(dataset) == 30
    assert len(set(dataset.labels)) == 30  # 30 of 200 classes: class-balanced means all different
    for index in range(0, 30, 7):
        sample, record = dataset[index], dataset.records[index]
        wnid, x0, y0, x1, y1 = rows[record.key]
        assert sample.label == wnids.index(wnid)
        height, width = sample.image.shape[-2:]
        expected = torch.tensor(
            [int(x0) / width, int(y0) / height, (int(x1) + 1) / width, (int(y1) + 1) / height]
        )
        torch.testing.assert_close(sample.box, expected)
    assert build_dataset("tinyimagenet", datasets_root, limit=30, seed=2).records == dataset.records


def make_tiny_layout(root: Path, lines: list[str]) -> None:
    rng = np.random.default_rng(5)
    for name in ("val_0.JPEG", "val_1.JPEG"):
        path = root / "val" / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_rgb(rng, 16, 16)).save(path, format="JPEG")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("n01\nn02\n")


def test_tinyimagenet_errors(tmp_path):
    good = ["val_0.JPEG\tn01\t0\t0\t7\t9", "val_1.JPEG\tn02\t2\t3\t15\t15"]
    make_tiny_layout(tmp_path / "ok", good)
    dataset = build_dataset("tinyimagenet", tmp_path / "ok")
    assert dataset.labels == [0, 1] and dataset.classes == ["n01", "n02"]
    torch.testing.assert_close(dataset[0].box, torch.tensor([0.0, 0.0, 8 / 16, 10 / 16]))

    make_tiny_layout(tmp_path / "bad", [good[0], "val_1.JPEG\tn02\t2\tthree\t15\t15"])
    with pytest.raises(ValueError, match=r"val_annotations\.txt:2: bad annotation line"):
        build_dataset("tinyimagenet", tmp_path / "bad")
    make_tiny_layout(tmp_path / "gone", [*good, "val_7.JPEG\tn01\t0\t0\t1\t1"])
    with pytest.raises(FileNotFoundError, match=r"val_annotations\.txt:3 names image 'val_7\.JPEG'"):
        build_dataset("tinyimagenet", tmp_path / "gone")
    make_tiny_layout(tmp_path / "wnid", [good[0], "val_1.JPEG\tn99\t0\t0\t1\t1"])
    with pytest.raises(ValueError, match="n99"):
        build_dataset("tinyimagenet", tmp_path / "wnid")
    (tmp_path / "noimages").mkdir()
    with pytest.raises(FileNotFoundError, match=r"noimages/val/images"):
        build_dataset("tinyimagenet", tmp_path / "noimages")


# -- COCO128 ---------------------------------------------------------------------------------------
def largest_yolo_box(path: Path) -> tuple[int, list[float]]:
    rows = [[float(v) for v in line.split()] for line in path.read_text().splitlines() if line.strip()]
    areas = [r[3] * r[4] for r in rows]
    c, cx, cy, w, h = rows[areas.index(max(areas))]
    return int(c), [max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(1.0, cx + w / 2), min(1.0, cy + h / 2)]


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_coco128_real_split(datasets_root, split):
    folder = datasets_root / "coco128"
    dataset = build_dataset("coco128", folder, split=split)
    assert len(dataset) == 128 and dataset.num_classes == 80
    panoptic = yaml.safe_load((folder / "semantic_segmentation" / "config.yaml").read_text())["classes"]
    names = yaml.safe_load((folder / "object_detection" / "config.yaml").read_text())["names"]
    assert dataset.mask_classes == [panoptic[i] for i in sorted(panoptic) if i != 0]
    with_mask = build_dataset("coco128", datasets_root, split=split, require=["mask"], limit=6, seed=1)
    assert len(with_mask) == 6
    for index in range(len(with_mask)):
        sample, record = with_mask[index], with_mask.records[index]
        raw = np.asarray(Image.open(record.mask)).astype(np.int64)
        assert sample.mask.shape == sample.image.shape[-2:]
        assert bool((sample.mask[torch.from_numpy(raw == 0)] == IGNORE_INDEX).all())
        for raw_id in np.unique(raw[raw > 0])[:4]:
            mapped = sample.mask[torch.from_numpy(raw == raw_id)].unique()
            assert mapped.numel() == 1 and with_mask.mask_classes[int(mapped)] == panoptic[int(raw_id)]
        label_file = folder / "object_detection" / "labels" / split / f"{record.key}.txt"
        if label_file.is_file():
            class_id, box = largest_yolo_box(label_file)
            assert sample.label == class_id and dataset.classes[class_id] == names[class_id]
            torch.testing.assert_close(sample.box, torch.tensor(box), atol=1e-6, rtol=0)
        else:
            assert sample.label is None and sample.box is None
    masked = build_dataset("coco128", datasets_root, split=split, require="mask")
    assert len(masked) == len(list((folder / "semantic_segmentation" / "masks" / split).glob("*.png")))


def test_coco128_train_test_pair(datasets_root):
    train, test = build_train_test("coco128", datasets_root, limit=20, test_fraction=0.25)
    assert (train.split, test.split, len(train), len(test)) == ("train2017", "val2017", 15, 5)
    with pytest.raises(ValueError, match="split='test2017' is unknown; accepted: train2017, val2017"):
        build_dataset("coco128", datasets_root, split="test2017")


def make_coco_layout(root: Path) -> None:
    rng = np.random.default_rng(2)
    for stem in ("a", "b"):
        write_png(root / "images" / "train2017" / f"{stem}.png", random_rgb(rng, 12, 10))
    write_png(
        root / "semantic_segmentation" / "masks" / "train2017" / "a.png", np.full((12, 10), 5, np.uint8)
    )
    (root / "semantic_segmentation" / "config.yaml").write_text(
        "classes:\n  0: unlabeled\n  5: dog\n  9: sky\n"
    )
    labels = root / "object_detection" / "labels" / "train2017"
    labels.mkdir(parents=True)
    (root / "object_detection" / "config.yaml").write_text("names:\n  0: cat\n  1: dog\n")
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.6 0.4\n")


def test_coco128_errors(tmp_path):
    root = tmp_path / "coco"
    make_coco_layout(root)
    dataset = build_dataset("coco128", root)
    assert dataset.labels == [1, None] and dataset.mask_classes == ["dog", "sky"]
    assert dataset[0].mask.unique().tolist() == [0]
    torch.testing.assert_close(dataset[0].box, torch.tensor([0.2, 0.3, 0.8, 0.7]))

    write_png(
        root / "semantic_segmentation" / "masks" / "train2017" / "b.png", np.full((12, 10), 7, np.uint8)
    )
    with pytest.raises(ValueError, match=r"mask .*b\.png holds class ids \[7\]"):
        build_dataset("coco128", root)[1]
    write_png(root / "semantic_segmentation" / "masks" / "train2017" / "b.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(
        ValueError, match=r"mask .*b\.png is \(5, 5\) pixels but its image .*b\.png is \(12, 10\)"
    ):
        build_dataset("coco128", root)[1]
    write_png(
        root / "semantic_segmentation" / "masks" / "train2017" / "orphan.png", np.zeros((4, 4), np.uint8)
    )
    with pytest.raises(ValueError, match=r"masks without an image .*orphan\.png"):
        build_dataset("coco128", root)
    (root / "semantic_segmentation" / "masks" / "train2017" / "orphan.png").unlink()

    (root / "object_detection" / "labels" / "train2017" / "b.txt").write_text("1 0.5 0.5 0.2\n")
    with pytest.raises(ValueError, match=r"b\.txt:1: bad YOLO line"):
        build_dataset("coco128", root)
    (root / "object_detection" / "labels" / "train2017" / "b.txt").write_text("\n7 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ValueError, match=r"b\.txt:2: YOLO class id 7 is outside 0\.\.1"):
        build_dataset("coco128", root)
    (root / "object_detection" / "labels" / "train2017" / "b.txt").write_text("0 0.5 1.5 0.2 0.2\n")
    with pytest.raises(ValueError, match=r"b\.txt:1: YOLO box .* must be normalised"):
        build_dataset("coco128", root)
    with pytest.raises(FileNotFoundError, match=r"coco128 images folder .*val2017 does not exist"):
        build_dataset("coco128", root, split="val2017")
    (root / "object_detection" / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match=r"object_detection/config\.yaml"):
        build_dataset("coco128", root)


# -- building, roots, subsets, splits --------------------------------------------------------------
def test_build_dataset_errors_and_roots(datasets_root, monkeypatch):
    with pytest.raises(ValueError, match="name='cifar' is unknown; accepted: " + ", ".join(sorted(DATASETS))):
        build_dataset("cifar")
    with pytest.raises(ValueError, match="require=\\['depth'\\] is unknown"):
        build_dataset("synthetic", require=["depth"])
    monkeypatch.delenv("FUSION_DATA", raising=False)
    with pytest.raises(ValueError, match=r"needs a folder.*FUSION_DATA"):
        build_dataset("coco128")
    monkeypatch.setenv("FUSION_DATA", str(datasets_root / "missing"))
    with pytest.raises(FileNotFoundError, match=r"\$FUSION_DATA folder .*missing does not exist"):
        build_dataset("coco128")
    monkeypatch.setenv("FUSION_DATA", str(datasets_root))
    from_env = build_dataset("coco128", limit=4)
    from_own_folder = build_dataset("coco128", datasets_root / "coco128", limit=4)
    assert from_env.root == from_own_folder.root == datasets_root / "coco128"
    assert from_env.identity() == from_own_folder.identity()
    assert from_env.identity() != build_dataset("coco128", limit=5).identity()


def test_balanced_subset_is_even_and_reproducible():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 5, 203).tolist() + [None] * 9
    chosen = balanced_subset(labels, 23, seed=3)
    assert chosen == balanced_subset(labels, 23, seed=3) and chosen != balanced_subset(labels, 23, seed=4)
    assert len(set(chosen)) == 23 and chosen == sorted(chosen)
    counts = collections.Counter(labels[i] for i in chosen)
    assert len(counts) == 6 and max(counts.values()) - min(counts.values()) <= 1
    assert balanced_subset(labels, 1000, seed=0) == list(range(len(labels)))
    with pytest.raises(ValueError, match="limit must be a positive int, got 0"):
        balanced_subset(labels, 0, seed=0)


@pytest.mark.parametrize("fraction", [0.2, 0.3, 0.5])
def test_stratified_split_is_balanced_and_reproducible(fraction):
    rng = np.random.default_rng(11)
    labels = torch.from_numpy(rng.integers(0, 7, 311))
    labels[labels == 6] = 5  # class 6 gone: a gap in the ids
    labels = torch.cat([labels, torch.tensor([9])])  # a singleton class
    train, test = stratified_split(labels, fraction, seed=5)
    assert (train, test) == stratified_split(labels, fraction, seed=5)
    assert (train, test) != stratified_split(labels, fraction, seed=6)
    assert sorted(train + test) == list(range(len(labels))) and not set(train) & set(test)
    for label in labels.unique().tolist():
        members = (labels == label).sum().item()
        in_test = (labels[test] == label).sum().item()
        if members == 1:
            assert in_test == 0
        else:
            assert abs(in_test - members * fraction) <= 1 and 1 <= in_test < members
    for bad in (0.0, 1.0, -0.1, "half"):
        with pytest.raises(ValueError, match="test_fraction must be a number in \\(0, 1\\)"):
            stratified_split(labels, bad, seed=0)


def test_build_train_test_without_split_is_stratified():
    train, test = build_train_test("synthetic", num_images=60, image_size=24, test_fraction=0.25, seed=2)
    assert len(train) + len(test) == 60
    assert {r.key for r in train.records}.isdisjoint(r.key for r in test.records)
    test_counts = collections.Counter(test.labels)
    assert set(test_counts) == set(range(len(SHAPES))) and set(test_counts.values()) <= {2, 3}


# -- batching --------------------------------------------------------------------------------------
def test_load_batch_resizes_and_keeps_labels_aligned(tmp_path):
    root = tmp_path / "coco"
    make_coco_layout(root)
    rng = np.random.default_rng(4)
    mask = rng.choice(np.array([0, 5, 9], np.uint8), (12, 10))
    write_png(root / "semantic_segmentation" / "masks" / "train2017" / "a.png", mask)
    dataset = build_dataset("coco128", root)
    batch = load_batch(dataset, [1, 0], image_size=6)
    assert batch["images"].shape == (2, 3, 6, 6) and batch["images"].dtype == torch.uint8
    assert batch["labels"].tolist() == [IGNORE_INDEX, 1]
    assert bool((batch["masks"][0] == IGNORE_INDEX).all()) and batch["masks"].dtype == torch.long
    assert batch["boxes"][0].isnan().all()
    torch.testing.assert_close(batch["boxes"][1], dataset[0].box)
    # nearest neighbour: output (i, j) takes source pixel (floor(i * 12 / 6), floor(j * 10 / 6))
    full = dataset[0].mask
    rows, cols = (torch.arange(6) * 12) // 6, (torch.arange(6) * 10) // 6
    assert torch.equal(batch["masks"][1], full[rows][:, cols])


def test_load_batch_images_and_errors():
    dataset = build_dataset("synthetic", num_images=6, image_size=16)
    same = load_batch(dataset, range(3), image_size=16)
    assert torch.equal(same["images"][2], dataset[2].image) and torch.equal(same["masks"][1], dataset[1].mask)
    doubled = load_batch(dataset, [4], image_size=32)
    # an exact 2x nearest upsampling repeats every mask pixel in a 2x2 block
    assert torch.equal(doubled["masks"][0], dataset[4].mask.repeat_interleave(2, 0).repeat_interleave(2, 1))
    flat = load_batch(dataset, [0, 1], image_size=7)["images"].float()
    original = torch.stack([dataset[0].image, dataset[1].image]).float()
    assert abs(flat.mean() - original.mean()) < 3  # resampling keeps the mean brightness
    with pytest.raises(ValueError, match=r"indices \[6\] are out of range for synthetic of 6 images"):
        load_batch(dataset, [0, 6], image_size=8)
    with pytest.raises(ValueError, match="image_size must be a positive int, got 0"):
        load_batch(dataset, [0], image_size=0)
    with pytest.raises(ValueError, match="no indices"):
        load_batch(dataset, [], image_size=8)
