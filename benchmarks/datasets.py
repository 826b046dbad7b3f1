"""Labelled image datasets for the accuracy probes, behind a registry.

Every dataset yields :class:`Sample` objects: the image plus whichever of a class label, a semantic
mask and one box it has. Conventions shared by all of them:

* ``image``: uint8 ``(3, H, W)``, RGB, the file's own size.
* ``label``: an int in ``[0, num_classes)`` or None (no class for this image).
* ``mask``: int64 ``(H, W)`` with values in ``[0, num_mask_classes)``; ``IGNORE_INDEX`` (-1) marks
  pixels without a label (COCO's "unlabeled" 0). Class 0 is a real class wherever it appears in
  ``mask_classes`` (the synthetic set's "background").
* ``box``: float32 ``(4,)`` normalised ``(x0, y0, x1, y1)`` in [0, 1], or None.

Datasets are read in place, never copied. A dataset's folder comes from the ``root`` argument
(config ``data.root``) or, when that is None, from ``$FUSION_DATA``; when the given folder holds the
dataset's conventional subfolder (``coco128/``, ``tiny-imagenet-200-val/``) that subfolder is used,
so both the shared datasets folder and the dataset's own folder are accepted.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import PIL
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

ENV_VAR = "FUSION_DATA"
IGNORE_INDEX = -1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ANNOTATIONS = ("label", "mask", "box")


@dataclass(frozen=True)
class Sample:
    """One image and its annotations (see the module docstring for the conventions).

    Attributes:
        image: uint8 ``(3, H, W)``.
        label: class id or None.
        mask: int64 ``(H, W)``, ``IGNORE_INDEX`` (-1) for unlabelled pixels, or None.
        box: float32 ``(4,)`` normalised xyxy, or None.
    """

    image: torch.Tensor
    label: int | None = None
    mask: torch.Tensor | None = None
    box: torch.Tensor | None = None


@dataclass(frozen=True)
class Record:
    """What a dataset knows about one image before decoding it.

    ``box`` is normalised xyxy, except for datasets whose ``PIXEL_BOXES`` is true (inclusive pixel
    corners, normalised once the image size is known).
    """

    key: str
    label: int | None = None
    image: Path | None = None
    mask: Path | None = None
    box: tuple[float, float, float, float] | None = None


class ImageDataset:
    """A list of :class:`Record` plus the knowledge of how to load one; indexing gives a :class:`Sample`.

    Attributes:
        name: the registry name.
        root: the folder read (None for generated data).
        split: the split read, or None.
        classes: class names; ``label`` indexes them.
        mask_classes: mask class names (mask values index them), or None without masks.
        options: the dataset-specific options it was built with.
    """

    NAME: ClassVar[str]
    FOLDER: ClassVar[str | None] = None  # conventional subfolder of $FUSION_DATA; None: root required
    NEEDS_ROOT: ClassVar[bool] = True
    SPLITS: ClassVar[tuple[str, ...] | None] = None  # None: any subfolder name, or no split
    DEFAULT_SPLIT: ClassVar[str | None] = None
    TRAIN_TEST: ClassVar[tuple[str, str] | None] = None  # predefined (train, test) splits
    PIXEL_BOXES: ClassVar[bool] = False

    def __init__(
        self,
        records: list[Record],
        *,
        root: Path | None,
        split: str | None,
        classes: Sequence[str],
        mask_classes: Sequence[str] | None = None,
        options: dict | None = None,
    ) -> None:
        self.records = list(records)
        self.root = root
        self.split = split
        self.classes = list(classes)
        self.mask_classes = None if mask_classes is None else list(mask_classes)
        self.options = dict(options or {})

    @property
    def name(self) -> str:
        return self.NAME

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_mask_classes(self) -> int:
        return len(self.mask_classes or ())

    @property
    def labels(self) -> list[int | None]:
        """The class of every image, without decoding any."""
        return [record.label for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.NAME} index {index} is out of range for {len(self)} images")
        return self.load(self.records[index])

    def has(self, record: Record, annotation: str) -> bool:
        """Whether ``record`` carries ``annotation`` (``"label"``, ``"mask"`` or ``"box"``)."""
        return getattr(record, annotation) is not None

    def class_count(self, annotation: str) -> int:
        """The classes ``annotation`` takes: ``num_classes`` for labels, ``num_mask_classes`` for masks,
        0 for boxes."""
        return {"label": self.num_classes, "mask": self.num_mask_classes}.get(annotation, 0)

    def image_paths(self) -> list[Path]:
        """The image file of every record, in order (empty for generated data)."""
        return [record.image for record in self.records if record.image is not None]

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        """A dataset of the same kind holding only ``indices`` (in the order given)."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.records = [self.records[i] for i in indices]
        return view

    def identity(self) -> dict:
        """A JSON-able description of the images: name, root, split, options, size, a digest of the
        image keys and what decodes the pixels (for cache keys and reports). The files' contents are
        not read here; a feature cache key adds them (:class:`benchmarks.fingerprint.FileIndex`)."""
        digest = hashlib.sha256("\n".join(r.key for r in self.records).encode()).hexdigest()[:16]
        return {
            "name": self.NAME,
            "root": None if self.root is None else str(self.root),
            "split": self.split,
            "options": self.options,
            "size": len(self),
            "keys_sha256": digest,
            "pixels_from": self.pixels_from(),
        }

    def pixels_from(self) -> dict:
        """What the pixels depend on besides the files: the decoder (another Pillow may decode a
        file differently)."""
        return {"pillow": PIL.__version__}

    def load(self, record: Record) -> Sample:
        """Decode one record: the image, its mask (checked against the image size) and its box."""
        image = read_image(record.image)
        height, width = image.shape[-2:]
        mask = None
        if record.mask is not None:
            mask = self.read_mask(record.mask)
            if tuple(mask.shape) != (height, width):
                raise ValueError(
                    f"mask {record.mask} is {tuple(mask.shape)} pixels but its image {record.image} is "
                    f"{(height, width)}; a mask must match its image"
                )
        box = None
        if record.box is not None:
            box = torch.tensor(record.box, dtype=torch.float32)
            if self.PIXEL_BOXES:  # inclusive pixel corners -> normalised edges
                box = (box + torch.tensor([0.0, 0.0, 1.0, 1.0])) / torch.tensor(
                    [width, height, width, height], dtype=torch.float32
                )
            box = box.clamp(0.0, 1.0)
        return Sample(image=image, label=record.label, mask=mask, box=box)

    def read_mask(self, path: Path) -> torch.Tensor:
        """Read a mask file as int64 class indices; subclasses with id remapping override it."""
        return torch.from_numpy(read_mask_array(path).astype(np.int64))


DATASETS: dict[str, type[ImageDataset]] = {}


def register_dataset(cls: type[ImageDataset]) -> type[ImageDataset]:
    """Class decorator: make ``cls`` buildable by ``build_dataset(cls.NAME, ...)``."""
    DATASETS[cls.NAME] = cls
    return cls


# -- file helpers ----------------------------------------------------------------------------------
def read_image(path: Path) -> torch.Tensor:
    """Decode an image file to uint8 ``(3, H, W)`` RGB.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image (the message names it).
    """
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"image file {path} cannot be read as an image: {error}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_mask_array(path: Path) -> np.ndarray:
    """Decode a single-channel mask file (modes L, P, I, I;16) to a 2-D integer array.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable, or not single-channel.
    """
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(
                    f"mask file {path} has image mode {image.mode!r}; accepted: single-channel L, P, I, I;16"
                )
            return np.asarray(image).astype(np.int64)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"mask file {path} cannot be read as an image: {error}") from None


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside ``folder`` (by suffix, case-insensitive), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a folder, else raise FileNotFoundError naming it and ``what`` it is."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} does not exist")
    return path


def load_yaml(path: Path) -> dict:
    """Read a YAML mapping; FileNotFoundError / ValueError name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def id_names(path: Path, key: str) -> dict[int, str]:
    """The ``{id: name}`` mapping under ``key`` in a YAML config, with integer ids."""
    table = load_yaml(path).get(key)
    if not isinstance(table, dict) or not table:
        raise ValueError(f"config file {path} has no {key!r} mapping of class id to name")
    try:
        return {int(k): str(v) for k, v in table.items()}
    except (TypeError, ValueError):
        raise ValueError(f"config file {path}: {key!r} keys must be integer class ids") from None


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
            panoptic = id_names(root / "semantic_segmentation" / "config.yaml", "classes")
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
                f"{self.root / 'semantic_segmentation' / 'config.yaml'}"
            )
        return torch.from_numpy(lut[ids])


# -- synthetic -------------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
WORDS = ("fuse", "clip", "dino", "grid", "patch", "token", "layer", "merge", "vit", "lens", "axis", "mode")


def shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[list[tuple]]:
    """Polygons (outer outlines) of a shape of circumradius ``radius`` turned by ``angle`` radians."""

    def turn(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in points]

    def regular(n: int, scale: float = 1.0, phase: float = 0.0) -> list[tuple[float, float]]:
        return [
            (scale * math.cos(phase + 2 * math.pi * k / n), scale * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)
        ]

    if kind == "square":
        return [turn(regular(4, phase=math.pi / 4))]
    if kind == "triangle":
        return [turn(regular(3, phase=-math.pi / 2))]
    if kind == "star":
        outer, inner = regular(5, 1.0, -math.pi / 2), regular(5, 0.42, -math.pi / 2 + math.pi / 5)
        return [turn([p for pair in zip(outer, inner) for p in pair])]
    if kind == "cross":
        arm = 0.3
        return [
            turn([(-1, -arm), (1, -arm), (1, arm), (-1, arm)]),
            turn([(-arm, -1), (arm, -1), (arm, 1), (-arm, 1)]),
        ]
    raise ValueError(f"no polygon for shape {kind!r}")


def draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, radius: float, angle: float
) -> None:
    """Fill the shape with 1 on an ``L`` mask canvas."""
    if kind in ("circle", "ring"):
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
        if kind == "ring":
            hole = 0.55 * radius
            draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=0)
        return
    for polygon in shape_polygon(kind, cx, cy, radius, angle):
        draw.polygon(polygon, fill=1)


def textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float (size, size, 3) background: a smooth colour field, a few stripes, pixel noise."""
    coarse = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8))
    field = np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.float32)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    theta, period = rng.uniform(0, math.pi), rng.uniform(4, 12)
    stripes = np.sin((xs * math.cos(theta) + ys * math.sin(theta)) * 2 * math.pi / period)
    field = field + 25.0 * stripes[..., None] * rng.uniform(-1, 1, 3)
    return field + rng.normal(0.0, 12.0, field.shape)


@register_dataset
class SyntheticShapesDataset(ImageDataset):
    """Generated on the fly, the default dataset: one shape per image on a textured background with a
    distractor word rendered in PIL's default font.

    Each image is a pure function of ``(seed, index)``, so any subset is the same images in any
    order. Labels are balanced (``num_images`` spread evenly over ``shapes``, in a seeded order).

    * ``label``: the shape kind (index into ``shapes``);
    * ``mask``: 0 for background, ``label + 1`` on the shape (``mask_classes`` = background + shapes);
    * ``box``: the tight normalised box of the shape's pixels.

    Args (options of :func:`build_dataset`):
        num_images: how many images (default 384).
        image_size: side of the square images in pixels (>= 16, default 64).
        shapes: the shape kinds used as classes, a subset of ``SHAPES`` (default all).
        words: draw the distractor word (default True).

    Raises:
        ValueError: bad ``num_images``, ``image_size``, ``shapes``, or a split (none exist).
    """

    NAME = "synthetic"
    NEEDS_ROOT = False
    SPLITS = ()
    # bump whenever load() draws other pixels for the same options: it is part of every cache key
    GENERATOR_VERSION = 1

    def __init__(
        self,
        root: Path | None = None,
        split: None = None,
        seed: int = 0,
        *,
        num_images: int = 384,
        image_size: int = 64,
        shapes: Sequence[str] = SHAPES,
        words: bool = True,
    ) -> None:
        if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
            raise ValueError(f"synthetic num_images must be a positive int, got {num_images!r}")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 16:
            raise ValueError(f"synthetic image_size must be an int >= 16, got {image_size!r}")
        shapes = [shapes] if isinstance(shapes, str) else list(shapes)
        unknown = [s for s in shapes if s not in SHAPES]
        if not shapes or unknown or len(set(shapes)) != len(shapes):
            raise ValueError(f"synthetic shapes={shapes!r} must be distinct names from: {', '.join(SHAPES)}")
        self.seed, self.image_size, self.words = int(seed), image_size, bool(words)
        order = np.random.default_rng([self.seed, 0x5EED]).permutation(np.arange(num_images) % len(shapes))
        records = [Record(key=f"{self.seed}:{i}", label=int(label)) for i, label in enumerate(order)]
        options = {"num_images": num_images, "image_size": image_size, "shapes": shapes, "words": words}
        super().__init__(
            records,
            root=None,
            split=None,
            classes=shapes,
            mask_classes=["background", *shapes],
            options=options,
        )

    def has(self, record: Record, annotation: str) -> bool:
        return True

    def pixels_from(self) -> dict:
        """The generator's version and the libraries that draw (Pillow: the shapes, words and
        resizing; numpy: the random streams); its parameters are the options."""
        return {"generator": self.GENERATOR_VERSION, "pillow": PIL.__version__, "numpy": np.__version__}

    def load(self, record: Record) -> Sample:
        size, label = self.image_size, record.label
        rng = np.random.default_rng([self.seed, int(record.key.split(":")[1])])
        canvas = Image.fromarray(np.clip(textured_background(rng, size), 0, 255).astype(np.uint8))
        if self.words:
            font = ImageFont.load_default(size=max(8, size // 6))
            position = (float(rng.uniform(0, size * 0.6)), float(rng.uniform(0, size * 0.8)))
            ImageDraw.Draw(canvas).text(
                position, str(rng.choice(WORDS)), fill=tuple(rng.integers(0, 256, 3).tolist()), font=font
            )
        radius = rng.uniform(0.2, 0.34) * size
        cx, cy = rng.uniform(radius, size - radius, 2)
        shape_canvas = Image.new("L", (size, size), 0)
        draw_shape(
            ImageDraw.Draw(shape_canvas), self.classes[label], cx, cy, radius, rng.uniform(0, 2 * math.pi)
        )
        inside = np.asarray(shape_canvas, dtype=bool)
        pixels = np.asarray(canvas, dtype=np.float32)
        # of a few random colours, the one farthest from the background it covers keeps the shape visible
        candidates = rng.integers(0, 256, (6, 3)).astype(np.float32)
        covered = pixels[inside].mean(axis=0)
        colour = candidates[np.abs(candidates - covered).sum(axis=1).argmax()]
        shaded = colour + rng.normal(0.0, 8.0, pixels.shape)
        pixels = np.where(inside[..., None], shaded, pixels)
        image = torch.from_numpy(np.clip(pixels, 0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous()
        mask = torch.from_numpy(inside.astype(np.int64) * (label + 1))
        ys, xs = np.nonzero(inside)
        box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32) / size
        return Sample(image=image, label=label, mask=mask, box=box)


# -- building --------------------------------------------------------------------------------------
def resolve_root(cls: type[ImageDataset], root: str | os.PathLike | None) -> Path | None:
    """The folder a dataset reads: ``root`` or ``$FUSION_DATA``, descending into the conventional
    subfolder when it is there.

    Raises:
        ValueError: no root given and ``$FUSION_DATA`` unset.
        FileNotFoundError: the folder does not exist.
    """
    if not cls.NEEDS_ROOT:
        return None if root is None else Path(root).expanduser()
    source = "root"
    if root is None:
        if not os.environ.get(ENV_VAR):
            raise ValueError(
                f"dataset {cls.NAME!r} needs a folder: pass root=PATH (config data.root) or set {ENV_VAR}"
            )
        root, source = os.environ[ENV_VAR], f"${ENV_VAR}"
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset {cls.NAME!r} {source} folder {path} does not exist")
    if cls.FOLDER and (path / cls.FOLDER).is_dir():
        path = path / cls.FOLDER
    return path


def balanced_subset(labels: Sequence[int | None], limit: int, seed: int) -> list[int]:
    """A deterministic subset of ``limit`` indices spread as evenly as possible over the classes.

    Classes are visited round-robin in a seeded order, each yielding its images in a seeded order;
    images without a label form one more group. Returns sorted indices (all when ``limit`` >= len).

    Raises:
        ValueError: ``limit`` is not a positive int.
    """
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    if limit >= len(labels):
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    groups: dict = {}
    for index, label in enumerate(labels):
        groups.setdefault(-1 if label is None else int(label), []).append(index)
    queues = [list(rng.permutation(groups[key])) for key in sorted(groups)]
    queues = [queues[i] for i in rng.permutation(len(queues))]
    chosen: list[int] = []
    while len(chosen) < limit:
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(int(queue.pop(0)))
    return sorted(chosen)


def build_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    require: Sequence[str] = (),
    **options,
) -> ImageDataset:
    """Build a registered dataset.

    Args:
        name: ``synthetic``, ``imagefolder``, ``tinyimagenet``, ``coco128`` (see ``DATASETS``).
        root: its folder, or the folder holding its conventional subfolder; None reads ``$FUSION_DATA``
            (generated datasets need none).
        split: the split to read (``train2017`` / ``val2017`` for coco128, a subfolder for
            imagefolder); None takes the dataset's default.
        limit: keep a deterministic, class-balanced subset of this many images.
        seed: seeds the subset choice and the generated datasets.
        require: keep only images carrying all of these annotations (``label``, ``mask``, ``box``).
        options: dataset-specific options (e.g. ``num_images`` for synthetic).

    Returns:
        An :class:`ImageDataset`; indexing it gives :class:`Sample` objects.

    Raises:
        ValueError: unknown name, split, option or annotation (the message lists the accepted ones);
            a missing root; any format error of the dataset itself.
        FileNotFoundError: a missing folder or file (named).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset name={name!r} is unknown; accepted: {', '.join(sorted(DATASETS))}")
    cls = DATASETS[name]
    accepted = [
        p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "root", "split", "seed")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"dataset {name!r} got unknown option(s) {unknown}; accepted: {', '.join(accepted) or 'none'}"
        )
    require = [require] if isinstance(require, str) else list(require)
    bad = [r for r in require if r not in ANNOTATIONS]
    if bad:
        raise ValueError(f"require={bad!r} is unknown; accepted: {', '.join(ANNOTATIONS)}")
    split = cls.DEFAULT_SPLIT if split is None else split
    if split is not None and cls.SPLITS is not None and split not in cls.SPLITS:
        raise ValueError(
            f"dataset {name!r} split={split!r} is unknown; "
            f"accepted: {', '.join(cls.SPLITS) or 'none (leave it None)'}"
        )
    folder = resolve_root(cls, root)
    kwargs = {"seed": seed} if "seed" in inspect.signature(cls.__init__).parameters else {}
    dataset = cls(folder, split, **kwargs, **options)
    if require:
        keep = [i for i, r in enumerate(dataset.records) if all(dataset.has(r, a) for a in require)]
        if not keep:
            raise ValueError(f"dataset {name!r} split {split!r} has no image with all of {require}")
        dataset = dataset.subset(keep)
    if limit is not None:
        dataset = dataset.subset(balanced_subset(dataset.labels, limit, seed))
    dataset.options = {**dataset.options, "require": require, "limit": limit, "seed": seed}
    return dataset


def stratified_split(
    labels: Sequence[int] | torch.Tensor, test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split indices into train and test with each class in the same proportion, reproducibly.

    Each class sends ``round(n_c * test_fraction)`` of its images (seeded choice) to test, but keeps at
    least one in train and, when it has two or more, puts at least one in test.

    Returns:
        ``(train_idx, test_idx)``: sorted, disjoint lists covering every index.

    Raises:
        ValueError: ``test_fraction`` outside (0, 1), or an empty ``labels``.
    """
    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if not labels:
        raise ValueError("stratified_split got no labels")
    rng = np.random.default_rng(seed)
    groups: dict = {}
    for index, label in enumerate(labels):
        groups.setdefault(-1 if label is None else int(label), []).append(index)
    train, test = [], []
    for key in sorted(groups):
        members = rng.permutation(groups[key]).tolist()
        count = len(members)
        n_test = min(count - 1, max(1 if count >= 2 else 0, round(count * test_fraction)))
        test += members[:n_test]
        train += members[n_test:]
    return sorted(train), sorted(test)


def build_train_test(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    require: Sequence[str] = (),
    **options,
) -> tuple[ImageDataset, ImageDataset]:
    """The train and test datasets a probe uses.

    Datasets with predefined splits (``TRAIN_TEST``, e.g. coco128's train2017 / val2017) read both,
    ``limit`` being shared out as ``(1 - test_fraction, test_fraction)``; the others are split with
    :func:`stratified_split` after taking the ``limit`` subset.

    Raises:
        ValueError / FileNotFoundError: as :func:`build_dataset` and :func:`stratified_split`.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset name={name!r} is unknown; accepted: {', '.join(sorted(DATASETS))}")
    pair = DATASETS[name].TRAIN_TEST
    common = {"seed": seed, "require": require, **options}
    if pair is not None:
        train_limit = test_limit = None
        if limit is not None:
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 2:
                raise ValueError(f"limit must be an int >= 2 for a train and a test split, got {limit!r}")
            test_limit = max(1, round(limit * test_fraction))
            train_limit = max(1, limit - test_limit)
        return (
            build_dataset(name, root, split=pair[0], limit=train_limit, **common),
            build_dataset(name, root, split=pair[1], limit=test_limit, **common),
        )
    dataset = build_dataset(name, root, limit=limit, **common)
    train_idx, test_idx = stratified_split(dataset.labels, test_fraction, seed)
    return dataset.subset(train_idx), dataset.subset(test_idx)


# -- batching --------------------------------------------------------------------------------------
def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """Squash a uint8 (3, H, W) image to (3, size, size) with antialiased bilinear resampling."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    resized = F.interpolate(
        image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-neighbour resize of an int64 (H, W) mask to (size, size); class ids are never mixed."""
    if tuple(mask.shape) == (size, size):
        return mask
    return F.interpolate(mask[None, None].double(), size=(size, size), mode="nearest")[0, 0].long()


def load_batch(dataset: ImageDataset, indices: Sequence[int], image_size: int) -> dict:
    """Decode ``indices`` of ``dataset`` into one square batch.

    Images are squashed (not cropped) to ``image_size`` so that masks (nearest) and normalised boxes
    stay aligned with them; each encoder then applies its own preprocessing.

    Returns:
        ``{"images": uint8 (B, 3, S, S), "labels": long (B,) | None, "masks": long (B, S, S) | None,
        "boxes": float32 (B, 4) | None}``. A field is None when no image of the batch has it; images
        lacking it in a batch where others have it get label -1, an all ``IGNORE_INDEX`` mask, or a
        NaN box, which the probes skip.

    Raises:
        ValueError: ``image_size`` not a positive int, no indices, or an index out of range.
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("load_batch got no indices")
    outside = [i for i in indices if not 0 <= i < len(dataset)]
    if outside:
        raise ValueError(
            f"load_batch indices {outside[:5]} are out of range for {dataset.NAME} of {len(dataset)} images"
        )
    samples = [dataset[i] for i in indices]
    batch: dict = {"images": torch.stack([resize_image(s.image, image_size) for s in samples])}
    batch["labels"] = (
        torch.tensor([IGNORE_INDEX if s.label is None else s.label for s in samples], dtype=torch.long)
        if any(s.label is not None for s in samples)
        else None
    )
    batch["masks"] = (
        torch.stack(
            [
                torch.full((image_size, image_size), IGNORE_INDEX, dtype=torch.long)
                if s.mask is None
                else resize_mask(s.mask, image_size)
                for s in samples
            ]
        )
        if any(s.mask is not None for s in samples)
        else None
    )
    batch["boxes"] = (
        torch.stack([torch.full((4,), float("nan")) if s.box is None else s.box for s in samples])
        if any(s.box is not None for s in samples)
        else None
    )
    return batch
