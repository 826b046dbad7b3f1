"""Encoder inputs: each family's own preprocessing (mean / std, resize, crop, default size) and every
input an encoder refuses, with a message that names the field, the value and what is accepted."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from encoder_fusion.encoders import EncoderSpec, build_encoder
from encoder_fusion.encoders.tiny import RECIPES, tiny_spec

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
HALF = (0.5, 0.5, 0.5)
# the accepted timm families, as every refusal of a model (timm, or open_clip's timm towers) lists them
FAMILIES = r"these families: vision_transformer .*eva .*naflexvit .*convnext"


def test_clip_and_dino_normalise_one_batch_differently():
    torch.manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    clip = build_encoder(tiny_spec("clip", image_size=56))
    dino = build_encoder(tiny_spec("dino", image_size=56))
    as_float = images.double() / 255.0  # already the input size: no resize, only the normalisation
    clip_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
    clip_std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)
    dino_mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    dino_std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    got_clip, got_dino = clip.preprocess(images), dino.preprocess(images)
    torch.testing.assert_close(got_clip.double(), (as_float - clip_mean) / clip_std, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_dino.double(), (as_float - dino_mean) / dino_std, rtol=1e-6, atol=1e-6)
    assert (got_clip - got_dino).abs().max() > 0.05
    # float input in [0, 1] is the same image as its uint8 version
    torch.testing.assert_close(clip.preprocess(images.float() / 255.0), got_clip)


# (source, kind) -> what its library's eval transform does: mean, resize, interpolation, crop_pct, and
# the default input size of the real model (DINOv3 256, PE-core 224 / 384, C-RADIO 512)
PREPROCESSING = {
    ("timm", "dinov3"): (IMAGENET_MEAN, "crop", "bicubic", 1.0, (256, 256)),
    ("timm", "siglip2"): (HALF, "crop", "bicubic", 0.9, (256, 256)),
    ("timm", "naflex_siglip2"): (HALF, "crop", "bicubic", 1.0, (384, 384)),
    ("timm", "pe_core"): (HALF, "crop", "bicubic", 1.0, (224, 224)),
    ("timm", "radio"): (CLIP_MEAN, "crop", "bicubic", 1.0, (512, 512)),
    ("timm", "convnext"): (CLIP_MEAN, "crop", "bicubic", 1.0, (256, 256)),
    ("timm", "siglip"): (HALF, "crop", "bicubic", 0.9, (224, 224)),
    ("open_clip", "clip"): (CLIP_MEAN, "crop", "bicubic", 1.0, (224, 224)),
    ("open_clip", "siglip"): (HALF, "squash", "bicubic", 1.0, (224, 224)),
    ("open_clip", "siglip2"): (HALF, "squash", "bicubic", 1.0, (256, 256)),
    ("open_clip", "pe_core"): (HALF, "squash", "bilinear", 1.0, (224, 224)),
    ("open_clip", "convnext"): (CLIP_MEAN, "crop", "bicubic", 1.0, (224, 224)),
    ("transformers", "clip"): (CLIP_MEAN, "crop", "bicubic", 1.0, (224, 224)),
    ("transformers", "dino_reg"): (IMAGENET_MEAN, "crop", "bicubic", 1.0, (224, 224)),
    ("transformers", "siglip"): (HALF, "squash", "bilinear", 1.0, (224, 224)),
    ("transformers", "dinov3"): (IMAGENET_MEAN, "squash", "bilinear", 1.0, (224, 224)),
    ("transformers", "siglip2"): (HALF, "squash", "bilinear", 1.0, (256, 256)),
}


@pytest.mark.parametrize("source,kind", sorted(PREPROCESSING))
def test_each_family_takes_its_librarys_own_preprocessing(source, kind):
    # the real architecture's defaults (image_size None), built at a tiny width and depth
    recipe = RECIPES[source, kind]
    spec = EncoderSpec(name=kind, source=source, model=recipe.model, weights="random",
                       model_kwargs=recipe.model_kwargs)  # fmt: skip
    preprocessing = build_encoder(spec).preprocessing
    mean, resize, interpolation, crop_pct, size = PREPROCESSING[source, kind]
    assert preprocessing.mean == pytest.approx(mean)
    assert (preprocessing.resize, preprocessing.interpolation) == (resize, interpolation)
    assert preprocessing.crop_pct == pytest.approx(crop_pct) and preprocessing.image_size == size


def test_pe_core_tiny_and_small_default_to_384():
    for model in ("vit_pe_core_tiny_patch16_384", "vit_pe_core_small_patch16_384"):
        spec = EncoderSpec(name="pe", source="timm", model=model, weights="random",
                           model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})  # fmt: skip
        assert build_encoder(spec).image_size == (384, 384)


def test_preprocess_resizes_any_input_to_the_encoder_size():
    from torchvision.transforms.v2 import functional as TF

    encoder = build_encoder(tiny_spec("dino", image_size=(32, 48)))
    images = torch.rand(2, 3, 75, 90)
    pixels = encoder.preprocess(images)
    # scale to cover 32x48 (75x90 -> 40x48), then centre-crop: the CLIP / DINOv2 eval transform
    expected = TF.resize(images, [40, 48], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    expected = TF.center_crop(expected, [32, 48]).clamp(0, 1)
    mean = torch.tensor(encoder.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.preprocessing.std).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, (expected - mean) / std, rtol=1e-4, atol=1e-4)


def test_crop_pct_resizes_past_the_crop_as_timm_does():
    from torchvision.transforms.v2 import functional as TF

    # timm's CLIP ViT evaluates at crop_pct 0.9: cover 32/0.9 x 48/0.9 (75x90 -> 44x53), crop 32x48
    encoder = build_encoder(tiny_spec("clip", image_size=(32, 48)))
    assert encoder.preprocessing.crop_pct == pytest.approx(0.9)
    images = torch.rand(2, 3, 75, 90)
    expected = TF.resize(images, [44, 53], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    expected = TF.center_crop(expected, [32, 48]).clamp(0, 1)
    mean = torch.tensor(encoder.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.preprocessing.std).view(1, 3, 1, 1)
    torch.testing.assert_close(encoder.preprocess(images), (expected - mean) / std, rtol=1e-4, atol=1e-4)


# -- bad inputs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dino():
    return build_encoder(tiny_spec("dino_reg", "dino"))


@pytest.mark.parametrize(
    "images,message",
    [
        (torch.rand(2, 1, 56, 56), "must have 3 channels"),
        (torch.rand(2, 4, 56, 56), "got 4"),
        (torch.rand(3, 56, 56), "must be 4-D"),
        (torch.rand(1, 2, 3, 56, 56), "must be 4-D"),
        (torch.rand(2, 3, 13, 56), "smaller than one patch of 14"),
        (torch.zeros(2, 3, 56, 56, dtype=torch.int32), "uint8"),
        (torch.rand(0, 3, 56, 56), "empty batch"),
    ],
)
def test_bad_images_are_refused(dino, images, message):
    with pytest.raises(ValueError, match=message):
        dino.preprocess(images)
    with pytest.raises(ValueError, match=message):
        dino.forward_grids(images)


@pytest.mark.parametrize("source", ["timm", "open_clip", "transformers"])
def test_layer_index_out_of_range_names_encoder_depth_and_index(source):
    kind = "clip"
    with pytest.raises(ValueError, match=r"index 4 is out of range for encoder 'vision' of depth 4"):
        build_encoder(tiny_spec(kind, "vision", source=source, layers=[0, 4]))
    with pytest.raises(ValueError, match=r"-5 .*depth 4"):
        build_encoder(tiny_spec(kind, "vision", source=source, layers=[-5]))


@pytest.mark.parametrize(
    "source,model,suggestion",
    [
        ("timm", "vit_small_patch14_reg4_dinov3", "vit_small_patch14_reg4_dinov2"),
        ("open_clip", "ViT-B-61", "ViT-B-16"),
        ("transformers", "dinov2_with_register", "dinov2_with_registers"),
    ],
)
def test_unknown_model_names_suggest_close_names(source, model, suggestion):
    spec = EncoderSpec(name="x", source=source, model=model, weights="random")
    with pytest.raises(ValueError, match=rf"{model!r} is not a known {source} model.*{suggestion}"):
        build_encoder(spec)


def test_unknown_hub_repo_offline_says_what_to_give():
    spec = EncoderSpec(name="x", source="transformers", model="nobody/no-such-model")
    with pytest.raises(ValueError, match=r"'nobody/no-such-model'.*not in the local cache.*offline"):
        build_encoder(spec)


def test_unknown_source_library_is_refused():
    with pytest.raises(ValueError, match=r"source='keras'.*accepted: timm, open_clip, transformers"):
        EncoderSpec(name="x", source="keras", model="vit")
    with pytest.raises(ValueError, match=r"source='keras'.*accepted"):
        build_encoder({"name": "x", "source": "keras", "model": "vit"})


@pytest.mark.parametrize(
    "source,model,kwargs,message",
    [
        ("timm", "vit_small_patch14_dinov2.not_a_tag", {}, r"tag 'not_a_tag' is unknown.*lvd142m"),
        (
            "timm",
            "resnet50",
            {},
            rf"'resnet50' is a timm resnet model; encoder 'x' accepts timm models with .*{FAMILIES}",
        ),
        ("timm", "mixer_b16_224", {}, rf"'mixer_b16_224' is a timm mlp_mixer model; .*accepts .*{FAMILIES}"),
        (
            "open_clip",
            "RN50",
            {},
            rf"has a ModifiedResNet image tower; .*\(ViT-\*\) and TimmModel towers of {FAMILIES}",
        ),
        ("timm", "convnext_base", {"depths": (1, 1, 1, 1), "dims": (8, 8, 8, 8)}, r"'post' is not available"),
        ("open_clip", "ViT-B-16", {"depth": 2}, r"key 'depth' is not an open_clip vision setting"),
        ("transformers", "dinov2", {"not_a_field": 1}, r"'not_a_field' is not a setting of Dinov2Config"),
        ("timm", "vit_small_patch14_dinov2", {"not_a_field": 1}, r"model_kwargs={'not_a_field': 1} are not"),
    ],
)
def test_models_and_settings_the_adapters_cannot_serve_are_refused(source, model, kwargs, message):
    hooks = {"norm": "post"} if model.startswith("convnext") else None
    spec = EncoderSpec(
        name="x", source=source, model=model, weights="random", model_kwargs=kwargs, hooks=hooks
    )
    with pytest.raises(ValueError, match=message):
        build_encoder(spec)


def test_unknown_pretrained_tag_lists_the_accepted_ones():
    spec = EncoderSpec(name="x", source="open_clip", model="ViT-B-16", weights="not_a_tag")
    with pytest.raises(ValueError, match=r"'not_a_tag'.*accepted tags: openai"):
        build_encoder(spec)


def test_tiny_spec_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match=r"kind='dino' is not offered by source 'open_clip'"):
        tiny_spec("dino", source="open_clip")
    with pytest.raises(ValueError, match=r"kind='resnet' is unknown; accepted: clip, dino"):
        tiny_spec("resnet")
    with pytest.raises(ValueError, match=r"source='jax' is unknown"):
        tiny_spec("clip", source="jax")


def test_hf_resize_then_crop_becomes_crop_pct(tmp_path):
    config = transformers.AutoConfig.for_model(
        "dinov2", num_hidden_layers=1, hidden_size=32, num_attention_heads=2, image_size=28
    )
    transformers.AutoModel.from_config(config).save_pretrained(tmp_path)
    # DINOv2's processor: shortest edge to 256, then a 224 centre crop
    processor = {
        "size": {"shortest_edge": 256},
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    encoder = build_encoder(EncoderSpec(name="dino", source="transformers", model=str(tmp_path)))
    assert encoder.image_size == (224, 224)
    assert encoder.preprocessing.crop_pct == pytest.approx(224 / 256)
