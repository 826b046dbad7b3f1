"""Inputs that would poison results are refused, trained parts load all or nothing, and errors raised
inside timm, open_clip and transformers reach the user translated, naming the setting or the file."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import encoder_fusion.model
from encoder_fusion import FusedEncoder
from encoder_fusion.encoders import build_encoder
from encoder_fusion.encoders.tiny import tiny_spec

SOURCES = ("timm", "open_clip", "transformers")
HEAD = {"layer_merge": "weighted_ln", "connector": {"kind": "mlp", "out_dim": 8}}


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_encoder(tiny_spec("clip", layers=(1, 3)))


# -- poisoned pixels -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scale", "shift", "fix"),
    [(255.0, 0.0, r"images / 255"), (2.0, -1.0, r"\(images \+ 1\) / 2"), (1.0, 0.01, r"images / 255")],
    ids=["0..255", "-1..1", "just above 1"],
)
def test_float_images_outside_the_unit_range_are_refused(clip, scale, shift, fix):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * scale + shift
    images[0, 0, 0, 0] = scale + shift  # the top of the range is reached
    with pytest.raises(
        ValueError, match=rf"images for encoder 'clip' are torch\.float32 with values in .*{fix}"
    ):
        clip.preprocess(images)


def test_rounding_slack_and_uint8_images_pass(clip):
    images = torch.rand(2, 3, 64, 64)
    images[0, 0, 0, 0], images[1, 2, 3, 4] = 1.0005, -0.0005  # a bicubic resize's overshoot
    for batch in (images, (images.clamp(0, 1) * 255).round().to(torch.uint8), images.double()):
        assert clip.preprocess(batch).isfinite().all()


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_name_their_images(clip, poison):
    images = torch.rand(5, 3, 64, 64)
    images[1, 2, 10, 10] = poison
    images[3, 0, 0, 0] = poison
    with pytest.raises(ValueError, match=r"hold NaN or Inf pixels in image\(s\) 1, 3 of the batch of 5"):
        clip.preprocess(images)
    # pixels handed straight to the encoder, past preprocess, are checked too
    pixels = clip.preprocess(torch.rand(5, 3, 64, 64))
    pixels[4, 1, 2, 3] = poison
    with pytest.raises(ValueError, match=r"in image\(s\) 4 of the batch of 5"):
        clip.forward_grids(pixels)


def test_a_fused_model_refuses_a_poisoned_batch_before_any_encoder_runs(clip):
    model = FusedEncoder([clip], connector={"kind": "linear", "out_dim": 4})
    images = torch.rand(2, 3, 64, 64) * 255
    with pytest.raises(ValueError, match=r"accepted: uint8 0\.\.255, or float in \[0, 1\]"):
        model(images)


# -- weights that hold NaN -----------------------------------------------------------------------
@pytest.mark.parametrize("source", ["timm", "transformers"])
def test_a_checkpoint_holding_nan_is_refused_naming_the_tensors(tmp_path, source):
    spec = tiny_spec("dino", source=source)
    weights = {k: v.clone().contiguous() for k, v in build_encoder(spec).model.state_dict().items()}
    poisoned = [k for k, v in weights.items() if v.is_floating_point()][:2]
    for key in poisoned:
        weights[key].view(-1)[0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(weights, str(path))
    with pytest.raises(
        ValueError, match=rf"checkpoint {path} holds NaN or Inf in 2 tensor\(s\): {poisoned[0]}"
    ):
        build_encoder(dataclasses.replace(spec, weights=str(path), on_missing="error"))


# -- trained parts: all or nothing ---------------------------------------------------------------
@pytest.fixture
def model(clip):
    torch.manual_seed(3)
    return FusedEncoder([clip], **HEAD).eval()


def head_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.head.state_dict().items()}


def rewrite(path: Path, change) -> None:
    """Rewrite a trained file with ``change(tensors, metadata)`` applied, keeping its checksum."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    change(tensors, metadata)
    save_file(tensors, str(path), metadata)


def assert_refused_untouched(model, path, message):
    before = head_state(model)
    with pytest.raises(ValueError, match=message):
        model.load_trained(path)
    after = head_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed load changed the model"


def test_a_file_with_flipped_bytes_is_refused_and_changes_nothing(tmp_path, model):
    path = model.save_trained(tmp_path / "fusion.safetensors")
    data = bytearray(path.read_bytes())
    for offset in range(len(data) - 64, len(data)):  # 64 bytes of the last tensor's data
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = FusedEncoder(list(model.encoders), **HEAD)
    assert_refused_untouched(fresh, path, rf"{path}: its tensors differ from the sha256 written with them")


def test_a_wrong_shaped_tensor_is_refused_before_any_tensor_is_copied(tmp_path, model):
    path = model.save_trained(tmp_path / "fusion.safetensors")
    last = sorted(model.head.state_dict())[-1]

    def widen(tensors, metadata):
        tensors[f"head.{last}"] = torch.zeros(tensors[f"head.{last}"].numel() + 1)
        del metadata["sha256"]  # shape is checked before the checksum; keep the message about it

    rewrite(path, widen)
    fresh = FusedEncoder(list(model.encoders), **HEAD)
    assert_refused_untouched(fresh, path, rf"{path} does not fit this model: wrong shapes: head\.{last}")


def test_nan_in_trained_layer_weights_is_refused(tmp_path, model):
    path = model.save_trained(tmp_path / "fusion.safetensors")

    def poison(tensors, metadata):
        key = next(k for k in tensors if "weight" in k)
        tensors[key].view(-1)[0] = float("nan")
        del metadata["sha256"]  # as a file written before checksums would be

    rewrite(path, poison)
    fresh = FusedEncoder(list(model.encoders), **HEAD)
    assert_refused_untouched(fresh, path, rf"{path} holds NaN or Inf in 1 tensor\(s\): head\.")


def test_metadata_that_is_not_json_names_the_file(tmp_path, model):
    path = model.save_trained(tmp_path / "fusion.safetensors")
    rewrite(path, lambda tensors, metadata: metadata.update(config="{not json"))
    assert_refused_untouched(model, path, rf"{path}: its metadata 'config' is not a JSON config")
    rewrite(path, lambda tensors, metadata: metadata.update(config="[1, 2]"))
    assert_refused_untouched(model, path, r"is not a JSON config \(a JSON list, not an object\)")


def test_missing_and_unexpected_tensors_are_named(tmp_path, model):
    path = model.save_trained(tmp_path / "fusion.safetensors")

    def rename(tensors, metadata):
        key = sorted(tensors)[0]
        tensors["head.stray"] = tensors.pop(key)

    rewrite(path, rename)
    assert_refused_untouched(
        model, path, r"does not fit this model: missing keys: .*; unexpected keys: head\.stray"
    )


def test_a_checksummed_round_trip_still_loads(tmp_path, model):
    path = model.save_trained(tmp_path / "fusion.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert len(handle.metadata()["sha256"]) == 64
    fresh = FusedEncoder(list(model.encoders), **HEAD).load_trained(path)
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(fresh(images), model(images))


def test_saving_names_the_file_that_blocks_the_path(tmp_path, model):
    (tmp_path / "runs").write_text("a file, not a folder")
    with pytest.raises(
        ValueError, match=rf"save_trained path .*: {tmp_path / 'runs'} is a file, not a folder"
    ):
        model.save_trained(tmp_path / "runs" / "deeper" / "fusion.safetensors")


def test_a_failed_write_names_the_file_and_leaves_nothing(tmp_path, model, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(encoder_fusion.model, "save_file", full_disk)
    with pytest.raises(OSError, match=r"save_trained could not write .*fusion\.safetensors: No space left"):
        model.save_trained(tmp_path / "fusion.safetensors")
    assert list(tmp_path.iterdir()) == []


# -- library errors, translated --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "kwargs", "message"),
    [
        (
            "timm",
            {"embed_dim": 33},
            r"model_kwargs=.*'embed_dim': 33.* are not accepted by timm model .*divisible",
        ),
        (
            "open_clip",
            {"width": 33},
            r"model_kwargs=.*'width': 33.* are not accepted by open_clip model .*divisible",
        ),
        (
            "transformers",
            {"hidden_size": 33},
            r"hidden_size 33 and num_attention_heads 2 .*accepted: a hidden_size",
        ),
    ],
)
def test_widths_the_heads_do_not_divide_are_named(source, kwargs, message):
    spec = tiny_spec("clip", source=source)
    with pytest.raises(ValueError, match=message):
        build_encoder(dataclasses.replace(spec, model_kwargs={**spec.model_kwargs, **kwargs}))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            "{not json",
            r"is not a Hugging Face model config \(It looks like the config file .*not a valid JSON",
        ),
        (json.dumps({"hidden_size": 8}), r"is not a Hugging Face model config \(Unrecognized model"),
    ],
)
def test_a_malformed_hugging_face_config_names_the_file(tmp_path, config, message):
    (tmp_path / "config.json").write_text(config)
    spec = dataclasses.replace(
        tiny_spec("clip", source="transformers"), model=str(tmp_path), model_kwargs=None
    )
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'} {message}"):
        build_encoder(spec)


@pytest.mark.parametrize("source", SOURCES)
def test_a_missing_local_model_folder_is_reported_as_such(source):
    spec = dataclasses.replace(tiny_spec("clip", source=source), model="./nope")
    with pytest.raises(
        FileNotFoundError, match=r"EncoderSpec\.model='\./nope' .* is a local path, and there is no folder"
    ):
        build_encoder(spec)


@pytest.mark.parametrize("source", SOURCES)
def test_an_image_size_off_the_patch_grid_warns_once_saying_what_is_read(source):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder = build_encoder(tiny_spec("clip", source=source, image_size=65))
        for _ in range(2):
            encoder.forward_grids(encoder.preprocess(torch.rand(1, 3, 80, 80)))
    messages = [str(w.message) for w in caught if "not a multiple" in str(w.message)]
    assert messages == [
        "encoder 'clip': 65x65 pixels are not a multiple of its 16-pixel patch; it reads the top-left 64x64 "
        "(4x4 patches) and drops the rest. Set image_size to a multiple of 16 to use every pixel"
    ]
