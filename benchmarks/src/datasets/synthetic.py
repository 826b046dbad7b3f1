"""The built-in synthetic dataset: one shape per image on a textured background, with a
distractor word; class, mask and box labels, generated on the fly."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw, ImageFont

from encoder_fusion.benchmarks.datasets.base import ImageDataset, Record, Sample, register_dataset

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
    field = np.asarray(coarse.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
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
        assert label is not None  # every generated image is labelled when its record is made
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
