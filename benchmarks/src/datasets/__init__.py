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

from encoder_fusion.benchmarks.datasets import formats, synthetic  # registers the datasets
from encoder_fusion.benchmarks.datasets.base import (
    ANNOTATIONS,
    DATASETS,
    ENV_VAR,
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    ImageDataset,
    Record,
    Sample,
    register_dataset,
)
from encoder_fusion.benchmarks.datasets.splits import (
    ON_BAD_IMAGE,
    balanced_subset,
    build_dataset,
    build_train_test,
    load_batch,
    load_split,
    resize_image,
    resize_mask,
    stratified_split,
)
from encoder_fusion.benchmarks.datasets.synthetic import SHAPES, WORDS, SyntheticShapesDataset

__all__ = [
    "ANNOTATIONS",
    "DATASETS",
    "ENV_VAR",
    "IGNORE_INDEX",
    "IMAGE_SUFFIXES",
    "ON_BAD_IMAGE",
    "SHAPES",
    "WORDS",
    "ImageDataset",
    "Record",
    "Sample",
    "SyntheticShapesDataset",
    "balanced_subset",
    "build_dataset",
    "build_train_test",
    "formats",
    "load_batch",
    "load_split",
    "register_dataset",
    "resize_image",
    "resize_mask",
    "stratified_split",
    "synthetic",
]
