"""The one image reader (encoder_fusion.images): images come out as a viewer shows them (EXIF orientation
applied, masks and boxes still on their objects), wide bit depths scaled by their real range, huge
images refused from their header, and the drop-in processor reading through the same reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from encoder_fusion.benchmarks.datasets.base import ImageDataset, Record
from encoder_fusion.images import read_image, shown_rgb, to_8_bits

ORIENTATION = 0x0112
# what a viewer does for each EXIF orientation, written by hand on (H, W, C) arrays
BY_HAND = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),  # turned a quarter clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


def save_with_orientation(path, array: np.ndarray, orientation: int) -> None:
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[ORIENTATION] = orientation
    image.save(path, exif=exif, quality=95)


def stored_pixels(path) -> np.ndarray:
    """The pixels as stored, orientation ignored (Pillow's plain decode)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)


@pytest.mark.parametrize("orientation", sorted(BY_HAND))
def test_a_jpeg_comes_out_as_a_viewer_shows_it(orientation, tmp_path):
    array = np.random.default_rng(orientation).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    path = tmp_path / "phone.jpg"
    save_with_orientation(path, array, orientation)
    shown = read_image(path)
    expected = BY_HAND[orientation](stored_pixels(path))
    assert tuple(shown.shape) == (3, *expected.shape[:2])
    torch.testing.assert_close(shown, chw(expected), rtol=0, atol=0)
    if orientation == 6:
        assert tuple(shown.shape[-2:]) == (64, 32)  # where the plain decode gives (32, 64)


class Shown(ImageDataset):
    NAME = "shown"


def test_masks_and_boxes_drawn_on_the_shown_image_stay_on_their_object(tmp_path):
    # the shown image (64 tall, 32 wide) has a white square at rows 40..55, columns 4..19
    shown = np.zeros((64, 32, 3), dtype=np.uint8)
    shown[40:56, 4:20] = 255
    mask = np.zeros((64, 32), dtype=np.uint8)
    mask[40:56, 4:20] = 1
    # a phone stores it turned a quarter anticlockwise, with Orientation=6 to turn it back
    save_with_orientation(tmp_path / "photo.jpg", np.rot90(shown, k=1).copy(), 6)
    Image.fromarray(mask).save(tmp_path / "photo.png")
    box = (4 / 32, 40 / 64, 20 / 32, 56 / 64)  # normalised xyxy on the shown image
    record = Record("photo", image=tmp_path / "photo.jpg", mask=tmp_path / "photo.png", box=box)
    data = Shown([record], root=tmp_path, split=None, classes=["thing"], mask_classes=["bg", "square"])
    sample = data[0]
    assert tuple(sample.image.shape) == (3, 64, 32)
    bright = sample.image.float().mean(0) > 128
    assert torch.equal(bright, sample.mask == 1)
    x0, y0, x1, y1 = (sample.box * torch.tensor([32, 64, 32, 64])).round().int().tolist()
    assert bright[y0:y1, x0:x1].all() and bright.sum() == (y1 - y0) * (x1 - x0)


def test_a_16_bit_gradient_keeps_its_256_levels(tmp_path):
    gradient = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    for suffix in (".png", ".tif"):
        path = tmp_path / f"gradient{suffix}"
        Image.fromarray(gradient).save(path)
        image = read_image(path)
        assert torch.unique(image).numel() == 256
        # the correct 8-bit image, computed here in float64: v * 255 / 65535, rounded
        expected = np.rint(gradient.astype(np.float64) * 255 / 65535).astype(np.uint8)
        for channel in image:
            assert torch.equal(channel, torch.from_numpy(expected))


def test_a_float_tiff_in_the_unit_range_keeps_its_levels(tmp_path):
    values = np.linspace(0.0, 1.0, 97 * 61, dtype=np.float32).reshape(97, 61)
    Image.fromarray(values).save(tmp_path / "float.tif")
    image = read_image(tmp_path / "float.tif")
    expected = np.rint(values.astype(np.float64) * 255).astype(np.uint8)
    assert torch.equal(image[1], torch.from_numpy(expected))
    assert torch.unique(image).numel() == 256


def test_32_bit_integers_and_floats_outside_the_unit_range_use_their_own_range(tmp_path):
    values = (np.arange(40 * 30, dtype=np.int64) * 3_000_000 - 2**31).astype(np.int32).reshape(40, 30)
    Image.fromarray(values).save(tmp_path / "int32.tif")
    image = read_image(tmp_path / "int32.tif")
    low, high = float(values.min()), float(values.max())
    expected = np.rint((values.astype(np.float64) - low) * 255 / (high - low)).astype(np.uint8)
    assert torch.equal(image[0], torch.from_numpy(expected))
    assert image.min() == 0 and image.max() == 255
    # mode "I" holding 16-bit values (as some PNG readers give them): the 16-bit range
    sixteen = np.array([[0, 257, 65535]], dtype=np.int32)
    assert to_8_bits(sixteen, "I").tolist() == [[0, 1, 255]]
    assert to_8_bits(np.full((2, 3), 7.5, dtype=np.float32), "F").tolist() == [[0] * 3] * 2


def test_non_finite_float_pixels_name_the_file(tmp_path):
    values = np.ones((8, 8), dtype=np.float32)
    values[3, 4] = np.nan
    Image.fromarray(values).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match=r"image file .*nan\.tif holds NaN or Inf pixel values"):
        read_image(tmp_path / "nan.tif")


def test_an_image_above_the_pixel_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    Image.new("RGB", (50, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's limit, the default of ours
    monkeypatch.delenv("FUSION_MAX_IMAGE_PIXELS", raising=False)
    with pytest.raises(
        ValueError,
        match=r"image file .*big\.png is 50x40 = 2,000 pixels, above the limit of 1,000 that guards against "
        r"decompression bombs; accepted: images up to 1,000 pixels \(raise the limit with "
        r"FUSION_MAX_IMAGE_PIXELS=<pixels>",
    ):
        read_image(tmp_path / "big.png")
    monkeypatch.setenv("FUSION_MAX_IMAGE_PIXELS", "2000")  # raised: read, Pillow's own guard left out
    assert tuple(read_image(tmp_path / "big.png").shape) == (3, 40, 50)
    assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's setting is restored
    monkeypatch.setenv("FUSION_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match=r"FUSION_MAX_IMAGE_PIXELS='lots' must be a positive int"):
        read_image(tmp_path / "big.png")


def test_unreadable_and_missing_files_are_named(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(ValueError, match=r"image file .*broken\.jpg cannot be read as an image"):
        read_image(tmp_path / "broken.jpg")
    with pytest.raises(FileNotFoundError, match=r"image file .*absent\.png does not exist"):
        read_image(tmp_path / "absent.png")


def test_a_truncated_jpeg_is_an_error_not_grey_pixels(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"image file .*cut\.jpg cannot be read as an image: .*truncated"):
        read_image(tmp_path / "cut.jpg")


def test_the_processor_reads_files_and_pillow_images_through_the_same_reader(tmp_path):
    from encoder_fusion.hf import FusedImageProcessor

    array = np.random.default_rng(5).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    path = tmp_path / "phone.jpg"
    save_with_orientation(path, array, 6)
    processor = FusedImageProcessor(size={"height": 32, "width": 32})
    upright = chw(BY_HAND[6](stored_pixels(path)))
    expected = processor(upright, return_tensors="pt")["pixel_values"]
    with Image.open(path) as image:
        from_pillow = processor(image, return_tensors="pt")["pixel_values"]
    from_path = processor(str(path), return_tensors="pt")["pixel_values"]
    for got in (from_pillow, from_path):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    gradient = Image.fromarray(np.arange(65536, dtype=np.uint16).reshape(256, 256))
    assert torch.equal(shown_rgb(gradient), read_image_of(gradient, tmp_path))


def read_image_of(image: Image.Image, folder) -> torch.Tensor:
    image.save(folder / "saved.png")
    return read_image(folder / "saved.png")
