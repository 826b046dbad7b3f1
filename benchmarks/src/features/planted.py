"""Planted-signal encoders: the proof that the harness finds a real gain, without pretrained weights.

``experiment=planted`` replaces the features of both encoders with features the harness plants from
the labels, each carrying one kind of information and not the other:

* ``class``: every token of an image is its class's fixed random vector (zeros without a label),
  plus noise: what the image is, and nothing about where;
* ``location``: every token is a fixed random vector scaled by how much of its grid cell the object
  covers (from the mask, else the box), plus noise: where the object is, and nothing about what.

CLIP-only then classifies but cannot find the object, DINOv2-only finds it but cannot name it, and
only a fusion of the two can segment it by class: the fused strategy's change against CLIP-only must
show an interval above zero on localization and dense segmentation. The encoders themselves (the
tiny random architectures of the preset) still run for the latency columns. Every report of such a
run says on its first line that the accuracies come from planted features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from encoder_fusion.benchmarks.options import OptionError

PLANTS = ("class", "location")
SCALE = 3.0  # the planted vector's norm, against noise of std ``noise`` per channel


def _direction(generator: torch.Generator, *shape: int) -> torch.Tensor:
    vectors = torch.randn(*shape, generator=generator)
    return SCALE * vectors / vectors.norm(dim=-1, keepdim=True)


def coverage(batch: dict, grid: tuple[int, int]) -> torch.Tensor:
    """Float ``(N, h, w)``: the share of each grid cell the object covers, from the masks (any class
    but 0, the background) or else the boxes.

    Raises:
        ValueError: a batch with neither masks nor boxes.
    """
    if batch.get("masks") is not None:
        inside = (batch["masks"] > 0).float()
    elif batch.get("boxes") is not None:
        size = batch["images"].shape[-1]
        centres = (torch.arange(size) + 0.5) / size
        boxes = batch["boxes"].nan_to_num(0.0)
        inside_x = (centres >= boxes[:, None, 0]) & (centres <= boxes[:, None, 2])
        inside_y = (centres >= boxes[:, None, 1]) & (centres <= boxes[:, None, 3])
        inside = (inside_y[:, :, None] & inside_x[:, None, :]).float()
    else:
        raise ValueError(
            "plant=location needs a dataset with masks or boxes (synthetic, coco128, tinyimagenet)"
        )
    return F.adaptive_avg_pool2d(inside[:, None], grid)[:, 0]


def check_noise(noise: object) -> None:
    """The noise is a standard deviation: a finite number >= 0.

    Raises:
        OptionError: naming ``noise`` and its value.
    """
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < math.inf:
        raise OptionError("{noise} must be a finite number >= 0 (a standard deviation)", {"noise": noise})


@dataclass(frozen=True)
class PlantOptions:
    """What to plant in place of each role's features (None: the encoder's own), and the noise std.

    Raises:
        OptionError: an unknown plant or a bad noise.
    """

    clip: str | None = None
    dino: str | None = None
    noise: float = 0.5

    def __post_init__(self) -> None:
        for role in ("clip", "dino"):
            plant = getattr(self, role)
            if plant is not None and plant not in PLANTS:
                raise OptionError(f"{{{role}}} is unknown; accepted: {', '.join(PLANTS)}", {role: plant})
        check_noise(self.noise)

    def of(self, role: str) -> str | None:
        """The plant of ``role`` (None for a role that keeps its own features)."""
        return getattr(self, role, None)


def planted_grids(
    plant: str,
    batch: dict,
    *,
    grid: tuple[int, int],
    width: int,
    layers: int,
    num_classes: int,
    noise: float,
    seed: int,
    noise_seed: int,
) -> list[torch.Tensor]:
    """The planted ``(N, h, w, width)`` grids of one encoder for ``batch``, one per hooked layer (each
    with its own noise).

    Args:
        plant: ``class`` or ``location``.
        batch: :func:`encoder_fusion.benchmarks.datasets.load_batch` output.
        grid, width, layers: the encoder's grid, channels and hooked layer count.
        num_classes: the dataset's classes (``class``).
        noise: std of the Gaussian noise per channel.
        seed: fixes the planted vectors (the same for every split, so that what a probe learns on
            the train split holds on the test split).
        noise_seed: fixes the noise (one per split).

    Raises:
        ValueError: an unknown plant, negative noise, or a batch without the labels it needs.
    """
    if plant not in PLANTS:
        raise ValueError(f"plant={plant!r} is unknown; accepted: {', '.join(PLANTS)}")
    check_noise(noise)
    generator = torch.Generator().manual_seed(seed)
    n = len(batch["images"])
    if plant == "class":
        if batch.get("labels") is None:
            raise ValueError("plant=class needs a dataset with class labels")
        vectors = torch.cat([_direction(generator, num_classes, width), torch.zeros(1, width)])
        # label -1 (none) picks the last row: zeros
        signal = vectors[batch["labels"]][:, None, None, :].expand(n, *grid, width)
    else:
        signal = coverage(batch, grid)[..., None] * _direction(generator, width)
    noisy = torch.Generator().manual_seed(noise_seed)
    return [signal + noise * torch.randn(n, *grid, width, generator=noisy) for _ in range(layers)]
