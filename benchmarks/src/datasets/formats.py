"""Datasets read from files in place: an ImageFolder, Tiny-ImageNet val and COCO128."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from encoder_fusion.benchmarks.datasets.base import (
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    ImageDataset,
    Record,
    id_names,
    image_files,
    read_mask_array,
    register_dataset,
    require_dir,
)


# -- imagefolder -----------------------------------------------------------------------------------
@register_dataset
class ImageFolderDataset(ImageDataset):
    """One subfolder per class (sorted names give the class ids), images directly inside each.

    ``split`` names a subfolder of the root holding such a tree (``train/``, ``val/``); None reads
    the root itself. Hidden folders and non-image files are skipped.

    Raises:
        FileNotFoundError: the root or split folder is missing.
        ValueError: no class folders, or a class folder with no images.
    """

    NAME = "imagefolder"

    def __init__(self, root: Path, split: str | None = None) -> None:
        folder = require_dir(
            root / split if split else root, f"imagefolder split {split!r}" if split else "imagefolder"
        )
        class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise ValueError(f"imagefolder {folder} has no class subfolders; expected one folder per class")
        records = []
        for label, class_dir in enumerate(class_dirs):
            files = image_files(class_dir)
            if not files:
                raise ValueError(
                    f"imagefolder class folder {class_dir} holds no images "
                    f"(accepted suffixes: {', '.join(IMAGE_SUFFIXES)})"
                )
            records += [Record(key=f"{class_dir.name}/{f.name}", label=label, image=f) for f in files]
        super().__init__(records, root=root, split=split, classes=[p.name for p in class_dirs])


# -- Tiny-ImageNet val -----------------------------------------------------------------------------
@register_dataset
class TinyImageNetDataset(ImageDataset):
    """The Tiny-ImageNet val layout: ``val/images/*.JPEG`` and ``val/val_annotations.txt`` with
    tab-separated ``file wnid x0 y0 x1 y1`` (one class and one inclusive pixel box per image).

    Classes follow ``wnids.txt`` when present, else the sorted wnids of the annotations; ``words.txt``
    (optional) gives readable names. Only the ``val`` split exists; split it with
    :func:`stratified_split`.

    Raises:
        FileNotFoundError: a missing folder, annotation file or annotated image.
        ValueError: a malformed annotation line, or a wnid missing from ``wnids.txt``.
    """

    NAME = "tinyimagenet"
    FOLDER = "tiny-imagenet-200-val"
    SPLITS = ("val",)
    DEFAULT_SPLIT = "val"
    PIXEL_BOXES = True

    def __init__(self, root: Path, split: str = "val") -> None:
        images_dir = require_dir(root / split / "images", "tinyimagenet images")
        annotations = root / split / f"{split}_annotations.txt"
        if not annotations.is_file():
            raise FileNotFoundError(f"tinyimagenet annotation file {annotations} does not exist")
        present = {p.name for p in image_files(images_dir)}
        rows = []
        for number, line in enumerate(annotations.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            try:
                if len(fields) != 6:
                    raise ValueError
                box = tuple(float(v) for v in fields[2:])
            except ValueError:
                raise ValueError(
                    f"{annotations}:{number}: bad annotation line {line!r}; expected 6 tab-separated "
                    "fields 'file wnid x0 y0 x1 y1'"
                ) from None
            if fields[0] not in present:
                raise FileNotFoundError(
                    f"{annotations}:{number} names image {fields[0]!r}, which is not in {images_dir}"
                )
            rows.append((fields[0], fields[1], box))
        if not rows:
            raise ValueError(f"tinyimagenet annotation file {annotations} lists no images")
        wnids_file = root / "wnids.txt"
        wnids = (
            [w.strip() for w in wnids_file.read_text().split() if w.strip()]
            if wnids_file.is_file()
            else sorted({wnid for _, wnid, _ in rows})
        )
        index = {wnid: i for i, wnid in enumerate(wnids)}
        unknown = sorted({wnid for _, wnid, _ in rows} - set(index))
        if unknown:
            raise ValueError(f"{annotations} uses wnids {unknown[:5]} that are not listed in {wnids_file}")
        records = [
            Record(key=name, label=index[wnid], image=images_dir / name, box=box) for name, wnid, box in rows
        ]
        super().__init__(records, root=root, split=split, classes=self.readable_names(root, wnids))

    @staticmethod
    def readable_names(root: Path, wnids: list[str]) -> list[str]:
        """``words.txt`` names for the wnids (first synonym), the wnid itself where it has none."""
        words_file = root / "words.txt"
        words = {}
        if words_file.is_file():
            for line in words_file.read_text().splitlines():
                wnid, _, name = line.partition("\t")
                words[wnid] = name.split(",")[0].strip()
        return [words.get(w) or w for w in wnids]


# -- COCO128 ---------------------------------------------------------------------------------------
def parse_yolo_file(path: Path, num_classes: int) -> list[tuple[int, float, float, float, float]]:
    """Parse YOLO ``class cx cy w h`` lines (normalised); blank lines are skipped.

    Raises:
        ValueError: a line with the wrong field count, a non-numeric field, a class id outside
            ``[0, num_classes)``, or coordinates outside [0, 1] / a non-positive size (names file:line).
    """
    boxes = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 5:
                raise ValueError
            class_id, cx, cy, w, h = int(fields[0]), *(float(v) for v in fields[1:])
        except ValueError:
            raise ValueError(
                f"{path}:{number}: bad YOLO line {line!r}; expected 'class_id cx cy w h' (an int and four "
                "normalised floats)"
            ) from None
        if not 0 <= class_id < num_classes:
            raise ValueError(f"{path}:{number}: YOLO class id {class_id} is outside 0..{num_classes - 1}")
        if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
            raise ValueError(
                f"{path}:{number}: YOLO box {(cx, cy, w, h)} must be normalised: cx, cy in [0, 1], "
                "w, h in (0, 1]"
            )
        boxes.append((class_id, cx, cy, w, h))
    return boxes


def largest_box(boxes: list[tuple[int, float, float, float, float]]) -> tuple[int, tuple] | None:
    """The class and clamped normalised xyxy box of the largest YOLO box (first on ties), or None."""
    if not boxes:
        return None
    class_id, cx, cy, w, h = max(boxes, key=lambda b: b[3] * b[4])
    xyxy = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    return class_id, tuple(min(1.0, max(0.0, v)) for v in xyxy)


def stems_without(files: list[Path], stems: set[str], what: str, folder: Path) -> None:
    """Raise ValueError naming the first files of ``files`` whose stem has no image in ``folder``."""
    orphans = [f for f in files if f.stem not in stems]
    if orphans:
        shown = ", ".join(str(f) for f in orphans[:3])
        raise ValueError(
            f"{len(orphans)} {what} without an image of the same stem in {folder}: {shown}"
            + (" ..." if len(orphans) > 3 else "")
        )


@register_dataset
class Coco128Dataset(ImageDataset):
    """COCO128: ``images/<split>/*.jpg``, semantic masks ``semantic_segmentation/masks/<split>/*.png``
    and YOLO labels ``object_detection/labels/<split>/*.txt``, paired by file stem.

    * ``label`` / ``box``: the class (of the 80 detection classes, names from
      ``object_detection/config.yaml``) and normalised xyxy box of the *largest* YOLO box in the
      image, since the probes take one class and one box per image; None without boxes.
    * ``mask``: COCO panoptic category ids remapped to contiguous indices in id order (names from
      ``semantic_segmentation/config.yaml``); id 0 "unlabeled" becomes ``IGNORE_INDEX``. Only some
      images have a mask (``require=("mask",)`` in :func:`build_dataset` keeps those).

    Splits: ``train2017`` and ``val2017`` (the probes train on the first and test on the second).
    The mask and label folders are optional; the images folder is not.

    Raises:
        FileNotFoundError: a missing images folder or config file.
        ValueError: masks without an image, a bad YOLO line, a mask value that is not a class id
            of the config. (YOLO label files without an image are skipped.)
    """

    NAME = "coco128"
    FOLDER = "coco128"
    SPLITS = ("train2017", "val2017")
    DEFAULT_SPLIT = "train2017"
    TRAIN_TEST = ("train2017", "val2017")

    def __init__(self, root: Path, split: str = "train2017") -> None:
        images_dir = require_dir(root / "images" / split, "coco128 images")
        images = {p.stem: p for p in image_files(images_dir)}
        if not images:
            raise ValueError(f"coco128 images folder {images_dir} holds no images")
        detection_config = root / "object_detection" / "config.yaml"
        names = id_names(detection_config, "names")
        classes = [names.get(i, str(i)) for i in range(max(names) + 1)]

        labels_dir = root / "object_detection" / "labels" / split
        targets: dict[str, tuple[int, tuple]] = {}
        if labels_dir.is_dir():
            # label files without an image are skipped: the published COCO128 has two of them
            label_files = [p for p in sorted(labels_dir.glob("*.txt")) if p.stem in images]
            for path in label_files:
                found = largest_box(parse_yolo_file(path, len(classes)))
                if found is not None:
                    targets[path.stem] = found

        masks_dir = root / "semantic_segmentation" / "masks" / split
        masks: dict[str, Path] = {}
        mask_classes = None
        if masks_dir.is_dir():
            mask_files = image_files(masks_dir)
            stems_without(mask_files, set(images), "masks", images_dir)
            masks = {p.stem: p for p in mask_files}
            self._classes_file = root / "semantic_segmentation" / "config.yaml"
            panoptic = id_names(self._classes_file, "classes")
            kept = sorted(i for i in panoptic if i != 0)
            mask_classes = [panoptic[i] for i in kept]
            # lookup table: panoptic id -> contiguous index; 0 and unknown ids marked for the check
            self._mask_lut = np.full(max(panoptic) + 1, IGNORE_INDEX - 1, dtype=np.int64)
            self._mask_lut[0] = IGNORE_INDEX
            self._mask_lut[kept] = np.arange(len(kept))

        records = [
            Record(
                key=stem,
                label=targets[stem][0] if stem in targets else None,
                image=path,
                mask=masks.get(stem),
                box=targets[stem][1] if stem in targets else None,
            )
            for stem, path in sorted(images.items())
        ]
        super().__init__(records, root=root, split=split, classes=classes, mask_classes=mask_classes)

    def read_mask(self, path: Path) -> torch.Tensor:
        ids = read_mask_array(path)
        lut = self._mask_lut
        bad = (ids >= len(lut)) | (lut[np.minimum(ids, len(lut) - 1)] < IGNORE_INDEX)
        if bad.any():
            raise ValueError(
                f"mask {path} holds class ids {sorted(set(ids[bad].tolist()))[:5]} that are not in "
                f"{self._classes_file}"
            )
        return torch.from_numpy(lut[ids])
