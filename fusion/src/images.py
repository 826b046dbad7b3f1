"""The one image reader of the project: files and Pillow images to uint8 ``(3, H, W)`` RGB, as an image
viewer shows them. The datasets of the harness and the drop-in processor both read through it.

* **Orientation.** The EXIF Orientation tag (phones write it) is applied, as viewers apply it, so a
  mask or box drawn on the shown image lines up with the pixels (``ImageOps.exif_transpose``).
* **Bit depth.** Images of more than 8 bits per channel are scaled to 8 bits by their real range, never
  clipped: 16-bit integers by the type's range (0 to 65535), floats whose values lie in [0, 1] by that
  range, and 32-bit integers or floats outside [0, 1] by the image's own minimum and maximum.
* **Size.** An image of more than :func:`max_pixels` pixels (Pillow's decompression-bomb limit,
  89,478,485 by default) is refused from its header, before it is decoded, with the limit and how to
  raise it (``FUSION_MAX_IMAGE_PIXELS``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS_ENV = "FUSION_MAX_IMAGE_PIXELS"
# bumped when the reader decodes a file differently (2: EXIF orientation, wide bit depths), so that
# features cached from the old pixels are not served
READER_VERSION = 2
_PILLOW_LIMIT = threading.Lock()  # Pillow's limit is a module global: one reader changes it at a time
# modes holding more than 8 bits per channel (Pillow's single-channel integer and float modes)
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class BadImageError(ValueError):
    """An image that cannot be used: not decodable (truncated, not an image), too large, or holding
    NaN or Inf. A ``ValueError``, so callers that catch those keep working; the harness's
    ``data.on_bad_image=skip`` skips exactly these."""


def max_pixels() -> int:
    """The largest image accepted, in pixels: ``FUSION_MAX_IMAGE_PIXELS``, else Pillow's
    ``PIL.Image.MAX_IMAGE_PIXELS``.

    Raises:
        ValueError: ``FUSION_MAX_IMAGE_PIXELS`` that is not a positive int.
    """
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None:
        return int(Image.MAX_IMAGE_PIXELS or 0) or 2**63 - 1
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r} must be a positive int (pixels)")
    return int(value)


@contextlib.contextmanager
def _own_size_check() -> Iterator[None]:
    """Pillow's decompression-bomb guard off while a header is read: :func:`check_size` replaces it
    with a limit the user can raise and an error that names the file."""
    with _PILLOW_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


def check_size(width: int, height: int, what: str) -> None:
    """Refuse an image of more than :func:`max_pixels` pixels.

    Raises:
        BadImageError: naming ``what``, its size, the limit and how to raise it.
    """
    limit = max_pixels()
    if width * height > limit:
        raise BadImageError(
            f"{what} is {width}x{height} = {width * height:,} pixels, above the limit of {limit:,} that "
            f"guards against decompression bombs; accepted: images up to {limit:,} pixels (raise the "
            f"limit with {MAX_PIXELS_ENV}=<pixels> if the file is trusted)"
        )


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to uint8 ``(3, H, W)`` RGB as a viewer shows it (see the module docstring).

    Raises:
        FileNotFoundError: the file does not exist.
        BadImageError: the file is not a readable image, too large, or holds NaN (the message names
            it).
    """
    path = Path(path)
    try:
        with _own_size_check():
            image = Image.open(path)
        with image:  # shown_rgb checks the size before any pixel is decoded
            return shown_rgb(image, f"image file {path}")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # SyntaxError: a broken PNG
        raise BadImageError(f"image file {path} cannot be read as an image: {error}") from None


def shown_rgb(image: Image.Image, what: str = "the image") -> torch.Tensor:
    """A Pillow image as uint8 ``(3, H, W)`` RGB: its EXIF orientation applied, more than 8 bits
    per channel scaled to 8 by their real range.

    Raises:
        BadImageError: too large, or a float image holding NaN or Inf (``what`` names it).
    """
    check_size(*image.size, what)
    image = ImageOps.exif_transpose(image)
    if image.mode in WIDE_MODES:
        gray = to_8_bits(np.asarray(image), image.mode, what)
        return torch.from_numpy(gray).expand(3, *gray.shape).contiguous()
    array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def to_8_bits(values: np.ndarray, mode: str, what: str = "the image") -> np.ndarray:
    """One channel of Pillow mode ``mode`` (one of :data:`WIDE_MODES`) as uint8, scaled by its real
    range: 16-bit integers (``I;16*``, and ``I`` whose values fit 16 bits, as some PNG readers give
    them) by 0 to 65535, ``F`` within [0, 1] by that range, anything else by the image's own range.

    Raises:
        BadImageError: NaN or Inf values (``what`` names the image).
    """
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise BadImageError(f"{what} holds NaN or Inf pixel values; accepted: finite values")
    low, high = float(values.min()), float(values.max())
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        low, high = 0.0, 65535.0
    elif mode == "F" and low >= 0.0 and high <= 1.0:
        low, high = 0.0, 1.0
    if high == low:  # a constant image of 32-bit values: no range to scale by
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)
