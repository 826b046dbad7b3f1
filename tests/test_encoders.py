"""Encoder adapters against their own libraries, on tiny random models of the real architectures.

Each parity test builds a model with the source library, perturbs every parameter (so that norms and
tokens are not at their init values), saves it as a checkpoint, loads it back through an
EncoderSpec and compares the grids with the library's own intermediate outputs.
"""

from __future__ import annotations

import functools
import types

import open_clip
import open_clip.timm_model
import pytest
import timm
import torch
import transformers
from checkpoints import perturb
from safetensors.torch import save_file

from fusion.encoders import EncoderSpec, build_encoder
from fusion.encoders.tiny import KINDS, RECIPES, tiny_spec
from fusion.hooks import HookSpec

DEPTH = 3
LAYERS = (-1, 0)  # out of order on purpose: outputs follow the spec, not the block order
PREFIX_TOKENS = {"clip": 1, "dino": 1, "dino_reg": 5, "siglip": 0}
SIZES = {"clip": (48, 80), "siglip": (48, 80), "dino": (42, 70), "dino_reg": (42, 70)}  # 3x5 grids
TOL = {"rtol": 1e-5, "atol": 1e-5}

TIMM_MODELS = {
    "clip": "vit_base_patch16_clip_224.openai",
    "dino": "vit_small_patch14_dinov2.lvd142m",
    "dino_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "siglip": "vit_base_patch16_siglip_224.webli",
}
TIMM_KWARGS = {"depth": DEPTH, "embed_dim": 32, "num_heads": 2}
OPEN_CLIP_MODELS = {"clip": "ViT-B-16", "siglip": "ViT-B-16-SigLIP"}
HF_TYPES = {
    "clip": ("clip_vision_model", {"patch_size": 16, "intermediate_size": 64}),
    "dino": ("dinov2", {"patch_size": 14}),
    "dino_reg": ("dinov2_with_registers", {"patch_size": 14, "num_register_tokens": 4}),
    "siglip": ("siglip_vision_model", {"patch_size": 16, "intermediate_size": 64}),
}
HF_KWARGS = {"num_hidden_layers": DEPTH, "hidden_size": 32, "num_attention_heads": 2}


def split_reference(grids, prefixes, num_prefix):
    """Library NCHW grids -> (B, h, w, C) grids; prefixes or an empty (B, 0, C) tensor."""
    grids = [g.permute(0, 2, 3, 1) for g in grids]
    if prefixes is None:
        prefixes = [g.new_zeros(g.shape[0], 0, g.shape[-1]) for g in grids]
    assert all(p.shape[1] == num_prefix for p in prefixes)
    return list(zip(grids, prefixes))


# -- references: (spec, reference(pixels, indices, norm) -> [(grid, prefix)]) per source ---------
def timm_case(tmp_path, kind, hooks):
    size = SIZES[kind]
    model = perturb(timm.create_model(TIMM_MODELS[kind], pretrained=False, img_size=size, **TIMM_KWARGS))
    path = tmp_path / "timm.safetensors"
    save_file(model.state_dict(), str(path))
    spec = EncoderSpec(
        name=kind, source="timm", model=TIMM_MODELS[kind], weights=str(path), image_size=size,
        model_kwargs=TIMM_KWARGS, hooks=hooks,
    )  # fmt: skip

    def reference(pixels, indices, norm):
        out = model.forward_intermediates(
            pixels, indices=indices, norm=norm, return_prefix_tokens=True, intermediates_only=True
        )
        if out and isinstance(out[0], tuple):
            return split_reference([o[0] for o in out], [o[1] for o in out], PREFIX_TOKENS[kind])
        return split_reference(out, None, PREFIX_TOKENS[kind])

    return spec, reference


def open_clip_case(tmp_path, kind, hooks):
    size, name = SIZES[kind], OPEN_CLIP_MODELS[kind]
    config = open_clip.get_model_config(name)
    if kind == "clip":
        vision = {**config["vision_cfg"], "width": 32, "layers": DEPTH, "head_width": 16, "image_size": size}
        text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
        clip = open_clip.create_model(name, pretrained=None, vision_cfg=vision, text_cfg=text)
        tower = perturb(clip.visual)
        # a full CLIP checkpoint as training scripts write it: wrapped, with a DDP prefix
        checkpoint = {"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}
        path = tmp_path / "open_clip.pt"
        torch.save(checkpoint, path)
        model_kwargs = {"width": 32, "layers": DEPTH, "heads": 2}
    else:
        # open_clip's TimmModel forwards no architecture arguments: shrink its timm trunk here
        tiny_timm = types.SimpleNamespace(create_model=functools.partial(timm.create_model, **TIMM_KWARGS))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(open_clip.timm_model, "timm", tiny_timm)
            tower = open_clip.model._build_vision_tower(config["embed_dim"], config["vision_cfg"])
        tower.set_input_size(size)
        tower = perturb(tower)
        path = tmp_path / "open_clip.safetensors"
        save_file({f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}, str(path))
        model_kwargs = TIMM_KWARGS
    spec = EncoderSpec(
        name=kind, source="open_clip", model=name, weights=str(path), image_size=size,
        model_kwargs=model_kwargs, hooks=hooks,
    )  # fmt: skip

    def reference(pixels, indices, norm):
        out = tower.forward_intermediates(
            pixels, indices=indices, normalize_intermediates=norm, intermediates_only=True,
            output_extra_tokens=True,
        )  # fmt: skip
        prefixes = out.get("image_intermediates_prefix")
        return split_reference(out["image_intermediates"], prefixes, PREFIX_TOKENS[kind])

    return spec, reference


def transformers_case(tmp_path, kind, hooks):
    size = SIZES[kind]
    model_type, extra = HF_TYPES[kind]
    config = transformers.AutoConfig.for_model(model_type, image_size=size[0], **HF_KWARGS, **extra)
    model = perturb(transformers.AutoModel.from_config(config))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    spec = EncoderSpec(name=kind, source="transformers", model=str(folder), image_size=size, hooks=hooks)
    final_norm = model.layernorm if kind.startswith("dino") else model.post_layernorm
    num_prefix = PREFIX_TOKENS[kind]

    def reference(pixels, indices, norm):
        kwargs = {} if kind.startswith("dino") else {"interpolate_pos_encoding": True}
        hidden = model(pixels, output_hidden_states=True, **kwargs).hidden_states
        grid_h, grid_w = pixels.shape[-2] // config.patch_size, pixels.shape[-1] // config.patch_size
        out = []
        for index in indices:
            tokens = hidden[index + 1]  # hidden[0] is the embedding output
            tokens = final_norm(tokens) if norm else tokens
            grid = tokens[:, num_prefix:].reshape(tokens.shape[0], grid_h, grid_w, -1)
            out.append((grid, tokens[:, :num_prefix]))
        return out

    return spec, reference


CASES = {"timm": timm_case, "open_clip": open_clip_case, "transformers": transformers_case}
SOURCE_KINDS = [(s, k) for s in CASES for k in KINDS if (s, k) in RECIPES]


@pytest.mark.parametrize("source,kind", SOURCE_KINDS)
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_grids_match_library_intermediates(tmp_path, source, kind, norm):
    hooks = HookSpec(layers=LAYERS, norm=norm, prefix="keep")
    spec, reference = CASES[source](tmp_path, kind, hooks)
    encoder = build_encoder(spec)
    assert encoder.weights_loaded == "pretrained"
    assert (encoder.depth, encoder.num_prefix_tokens) == (DEPTH, PREFIX_TOKENS[kind])
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, *SIZES[kind])
    with torch.no_grad():
        got = encoder.forward_tokens(pixels)
        expected = reference(pixels, sorted(encoder.layer_indices), norm == "post")
    by_block = dict(zip(sorted(encoder.layer_indices), expected))
    assert len(got) == len(LAYERS)
    for layer, index in zip(got, encoder.layer_indices):
        want_grid, want_prefix = by_block[index]
        assert layer.grid.shape == (2, 3, 5, 32)  # non-square input, non-square grid
        torch.testing.assert_close(layer.grid, want_grid, **TOL)
        torch.testing.assert_close(layer.prefix, want_prefix, **TOL)


@pytest.mark.parametrize(
    "source,kind", [("timm", "dino_reg"), ("open_clip", "clip"), ("transformers", "dino_reg")]
)
def test_prefix_drop_returns_the_same_grids_without_prefix(tmp_path, source, kind):
    keep, _ = CASES[source](tmp_path, kind, HookSpec(layers=LAYERS, prefix="keep"))
    drop = EncoderSpec.from_any({**keep.__dict__, "hooks": HookSpec(layers=LAYERS, prefix="drop")})
    pixels = torch.randn(2, 3, *SIZES[kind])
    with torch.no_grad():
        kept, dropped = build_encoder(keep).forward_tokens(pixels), build_encoder(drop).forward_tokens(pixels)
    for a, b in zip(kept, dropped):
        assert b.prefix is None and a.prefix.shape[1] == PREFIX_TOKENS[kind]
        torch.testing.assert_close(a.grid, b.grid, rtol=0, atol=0)


@pytest.mark.parametrize("source,kind", SOURCE_KINDS)
def test_blocks_after_the_deepest_hooked_layer_never_run(source, kind):
    encoder = build_encoder(tiny_spec(kind, source=source, layers=[1, 0]))
    calls = []
    for index, block in enumerate(encoder.blocks()):
        block.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
    images = torch.randint(0, 256, (2, 3, 50, 61), dtype=torch.uint8)
    grids = encoder(encoder.preprocess(images))
    assert calls == [0, 1]
    assert encoder.depth == 4 and [tuple(g.shape[:3]) for g in grids] == [(2, 4, 4)] * 2


@pytest.mark.parametrize("source,kind", SOURCE_KINDS)
def test_tiny_specs_report_their_geometry(source, kind):
    encoder = build_encoder(tiny_spec(kind, "enc", source=source, layers=[-2], prefix="keep"))
    assert encoder.spec.name == "enc" and encoder.weights_loaded == "random"
    assert encoder.num_prefix_tokens == PREFIX_TOKENS[kind]
    assert encoder.patch_size == (14 if kind.startswith("dino") else 16)
    assert (encoder.width, encoder.depth, encoder.layer_indices) == (32, 4, (2,))
    (layer,) = encoder.forward_tokens(encoder.preprocess(torch.rand(3, 3, 31, 90)))
    assert layer.grid.shape == (3, 4, 4, 32) and layer.prefix.shape == (3, PREFIX_TOKENS[kind], 32)


def test_encoders_are_frozen_and_stay_in_eval_mode():
    encoder = build_encoder(tiny_spec("dino_reg"))
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert encoder.training and not encoder.model.training
    assert not any(m.training for m in encoder.model.modules())


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


@pytest.mark.parametrize(
    "source,kind,mean",
    [
        ("open_clip", "clip", (0.48145466, 0.4578275, 0.40821073)),
        ("open_clip", "siglip", (0.5, 0.5, 0.5)),
        ("transformers", "clip", (0.48145466, 0.4578275, 0.40821073)),
        ("transformers", "dino_reg", (0.485, 0.456, 0.406)),
        ("transformers", "siglip", (0.5, 0.5, 0.5)),
        ("timm", "siglip", (0.5, 0.5, 0.5)),
    ],
)
def test_each_source_takes_the_models_own_normalisation(source, kind, mean):
    encoder = build_encoder(tiny_spec(kind, source=source))
    assert encoder.preprocessing.mean == pytest.approx(mean)


def test_preprocess_resizes_any_input_to_the_encoder_size():
    from torchvision.transforms.v2 import functional as TF

    encoder = build_encoder(tiny_spec("clip", image_size=(32, 48)))
    images = torch.rand(2, 3, 75, 90)
    pixels = encoder.preprocess(images)
    # scale to cover 32x48 (75x90 -> 40x48), then centre-crop: the CLIP / DINOv2 eval transform
    expected = TF.resize(images, [40, 48], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    expected = TF.center_crop(expected, [32, 48]).clamp(0, 1)
    mean = torch.tensor(encoder.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.preprocessing.std).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, (expected - mean) / std, rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("source", list(CASES))
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
        ("timm", "resnet50", {}, r"'resnet50' is a timm resnet model.*accepts timm VisionTransformer"),
        ("open_clip", "RN50", {}, r"ResNet image tower"),
        ("open_clip", "ViT-B-16", {"depth": 2}, r"key 'depth' is not an open_clip vision setting"),
        ("transformers", "dinov2", {"not_a_field": 1}, r"'not_a_field' is not a setting of Dinov2Config"),
        ("timm", "vit_small_patch14_dinov2", {"not_a_field": 1}, r"model_kwargs \['not_a_field'\]"),
    ],
)
def test_models_and_settings_the_adapters_cannot_serve_are_refused(source, model, kwargs, message):
    spec = EncoderSpec(name="x", source=source, model=model, weights="random", model_kwargs=kwargs)
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
