"""Building a dataset by name, balanced subsets, stratified train/test splits, and loading
batches of images and their labels at one size."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from encoder_fusion.benchmarks.datasets.base import (
    ANNOTATIONS,
    DATASETS,
    ENV_VAR,
    IGNORE_INDEX,
    ImageDataset,
    Sample,
)
from encoder_fusion.images import BadImageError

# what an image that cannot be used does (data.on_bad_image): stop the run naming it, or be left out
ON_BAD_IMAGE = ("stop", "skip")


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
    # a registered dataset is built from its folder and split (ImageDataset's own constructor takes
    # the records the subclass reads from them)
    dataset = cast(Callable[..., ImageDataset], cls)(folder, split, **kwargs, **options)
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
    labels: Sequence[int | None] | torch.Tensor, test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split indices into train and test with each class in the same proportion, reproducibly.
    Unlabelled images (None) are split as one class of their own.

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


def check_image_size(image_size: int) -> None:
    """Refuse a load size that is not a positive int, before any image is decoded."""
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


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
    check_image_size(image_size)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("load_batch got no indices")
    outside = [i for i in indices if not 0 <= i < len(dataset)]
    if outside:
        raise ValueError(
            f"load_batch indices {outside[:5]} are out of range for {dataset.NAME} of {len(dataset)} images"
        )
    return collate([dataset[i] for i in indices], image_size)


def load_split(
    dataset: ImageDataset, image_size: int, on_bad_image: str = "stop"
) -> tuple[ImageDataset, dict, list[dict[str, str]]]:
    """Decode every image of ``dataset`` into one batch (:func:`load_batch`), deciding what an image
    that cannot be used (:class:`encoder_fusion.images.BadImageError`: undecodable, too large, NaN)
    does: ``"stop"`` raises it, naming the file; ``"skip"`` leaves it out.

    Returns:
        ``(kept, batch, skipped)``: the dataset of the images kept (``dataset`` itself when none was
        skipped), their batch, and ``{"file", "error"}`` of every image skipped, in order.

    Raises:
        ValueError: ``image_size`` not a positive int, an unknown ``on_bad_image``, or every image
            skipped.
        BadImageError: with ``"stop"``, the first image that cannot be used.
    """
    check_image_size(image_size)
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image={on_bad_image!r} is unknown; accepted: {', '.join(ON_BAD_IMAGE)}")
    samples, kept, skipped = [], [], []
    for index, record in enumerate(dataset.records):
        try:
            samples.append(dataset[index])
        except BadImageError as error:
            if on_bad_image == "stop":
                raise
            skipped.append({"file": str(record.image), "error": str(error)})
            continue
        kept.append(index)
    if not samples:
        raise ValueError(
            f"every one of the {len(dataset)} images of {dataset.NAME} split {dataset.split!r} was "
            f"skipped as unusable; first: {skipped[0]['error'] if skipped else 'none'}"
        )
    if skipped:
        dataset = dataset.subset(kept)
    return dataset, collate(samples, image_size), skipped


def collate(samples: Sequence[Sample], image_size: int) -> dict:
    """Decoded samples as one square batch (the layout of :func:`load_batch`)."""
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
