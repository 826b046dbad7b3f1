"""The dataset interface, the conventions every dataset keeps, the registry, and the file
readers the formats share (see :mod:`encoder_fusion.benchmarks.datasets`)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import PIL
import torch
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError

from encoder_fusion.images import READER_VERSION, read_image

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
        not read here; a feature cache key adds them
        (:class:`encoder_fusion.benchmarks.features.fingerprint.FileIndex`)."""
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
        return {"pillow": PIL.__version__, "reader": READER_VERSION}

    def load(self, record: Record) -> Sample:
        """Decode one record: the image, its mask (checked against the image size) and its box."""
        if record.image is None:
            raise ValueError(
                f"record {record.key!r} of dataset {self.NAME!r} has no image file; a dataset that "
                "generates its images overrides ImageDataset.load"
            )
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
            # a mask with an EXIF orientation is shown turned, as read_image turns its image
            return np.asarray(ImageOps.exif_transpose(image)).astype(np.int64)
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
