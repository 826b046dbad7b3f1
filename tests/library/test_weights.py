"""Weight loading, offline first: every checkpoint format, the caches, and every way it can go wrong.

Checkpoints are made here from tiny random models of the real architectures; a checkpoint counts as
loaded when the encoder's grids equal the grids of the model that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import transformers
from checkpoints import perturb, put_in_hub_cache
from safetensors.torch import save_file

from encoder_fusion.encoders import EncoderSpec, build_encoder
from encoder_fusion.encoders.weights import local_weights_path, read_state_dict

TIMM_DINO_REG = "vit_small_patch14_reg4_dinov2"
TIMM_KWARGS = {"depth": 2, "embed_dim": 32, "num_heads": 2}
TOL = {"rtol": 1e-5, "atol": 1e-5}
# source -> a tiny model of that source and its overrides
TINY = {
    "timm": (TIMM_DINO_REG, TIMM_KWARGS),
    "open_clip": ("ViT-B-16", {"width": 32, "layers": 2, "heads": 2}),
    "transformers": ("dinov2", {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2}),
}


def timm_grids(model, pixels, indices=(0, 1)):
    """timm's own last-layer grids as (B, h, w, C)."""
    out = model.forward_intermediates(pixels, indices=list(indices), intermediates_only=True)
    return [g.permute(0, 2, 3, 1) for g in out]


def spec_for(path, **overrides) -> EncoderSpec:
    fields = dict(
        name="dino", source="timm", model=TIMM_DINO_REG, weights=path and str(path), image_size=42,
        model_kwargs=TIMM_KWARGS, hooks={"layers": [0, 1]},
    )  # fmt: skip
    return EncoderSpec(**{**fields, **overrides})


@pytest.fixture(scope="module")
def dino_reg() -> torch.nn.Module:
    return perturb(timm.create_model(TIMM_DINO_REG, pretrained=False, img_size=42, **TIMM_KWARGS))


def assert_loads_like(spec: EncoderSpec, model, size=(42, 42)):
    encoder = build_encoder(spec)
    assert encoder.weights_loaded == "pretrained"
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        for got, want in zip(encoder.forward_grids(pixels), timm_grids(model, pixels)):
            torch.testing.assert_close(got, want, **TOL)


# -- state dict files -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "suffix,wrap",
    [
        (".safetensors", lambda sd: sd),
        (".pt", lambda sd: sd),
        (".pth", lambda sd: {"state_dict": sd, "epoch": 3}),
        (".bin", lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}),
        (".ckpt", lambda sd: {"state_dict": {"model": sd}}),
    ],
)
def test_state_dict_files_in_every_wrapping_load(tmp_path, dino_reg, suffix, wrap):
    path = tmp_path / f"weights{suffix}"
    state_dict = {k: v.clone() for k, v in dino_reg.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state_dict, str(path))
    else:
        torch.save(wrap(state_dict), path)
    loaded = read_state_dict(path)
    assert loaded.keys() == state_dict.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    assert_loads_like(spec_for(path), dino_reg)


def test_original_dinov2_release_with_registers_loads_through_timms_filter(tmp_path, dino_reg):
    # the facebookresearch/dinov2 layout: CLS position inside pos_embed, register_tokens, mask_token
    timm_sd = dino_reg.state_dict()
    cls_pos = 0.1 * torch.randn(1, 1, 32)
    original = {k: v for k, v in timm_sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    original["pos_embed"] = torch.cat([cls_pos, timm_sd["pos_embed"]], dim=1)
    original["cls_token"] = timm_sd["cls_token"] - cls_pos
    original["register_tokens"] = timm_sd["reg_token"]
    original["mask_token"] = torch.zeros(1, 32)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(original, path)
    assert_loads_like(spec_for(path), dino_reg)


def test_other_image_size_resamples_position_embedding_like_timm(tmp_path, dino_reg):
    path = tmp_path / "w.safetensors"
    save_file(dino_reg.state_dict(), str(path))
    # timm's own loading of the same file into a model built for 70x56 pixels
    resized = timm.create_model(
        TIMM_DINO_REG, pretrained=True, img_size=(70, 56), pretrained_cfg_overlay={"file": str(path)},
        **TIMM_KWARGS,
    ).eval()  # fmt: skip
    assert_loads_like(spec_for(path, image_size=(70, 56)), resized, size=(70, 56))


def test_openai_clip_state_dict_loads_into_timm_clip(tmp_path):
    # a full CLIP checkpoint in the OpenAI / open_clip layout, read by timm's CLIP ViT
    vision = {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16}
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    clip = open_clip.create_model("ViT-B-16", pretrained=None, vision_cfg=vision, text_cfg=text)
    perturb(clip)
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    spec = EncoderSpec(
        name="clip", source="timm", model="vit_base_patch16_clip_224.openai", weights=str(path),
        image_size=32,
        model_kwargs=TIMM_KWARGS, hooks={"layers": [0, 1], "norm": "post"},
    )  # fmt: skip
    encoder = build_encoder(spec)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = clip.visual.forward_intermediates(
            pixels, indices=[0, 1], normalize_intermediates=True, intermediates_only=True
        )["image_intermediates"]
        for got, ref in zip(encoder.forward_grids(pixels), want):
            torch.testing.assert_close(got, ref.permute(0, 2, 3, 1), **TOL)


@pytest.fixture(scope="module")
def tiny_clip():
    vision = {"image_size": 48, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16}
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    return perturb(open_clip.create_model("ViT-B-16", pretrained=None, vision_cfg=vision, text_cfg=text))


def open_clip_spec(path, size=48, **hooks):
    return EncoderSpec(
        name="clip", source="open_clip", model="ViT-B-16", weights=str(path), image_size=size,
        model_kwargs={"width": 32, "layers": 2, "heads": 2}, hooks={"layers": [0, 1], **hooks},
    )  # fmt: skip


def open_clip_grids(tower, pixels):
    out = tower.forward_intermediates(pixels, indices=[0, 1], intermediates_only=True)
    return [g.permute(0, 2, 3, 1) for g in out["image_intermediates"]]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_openai_torchscript_archive_loads(tmp_path, tiny_clip):
    # OpenAI released CLIP as TorchScript archives of the whole two-tower model
    archive = torch.jit.trace_module(
        tiny_clip, {"encode_image": torch.randn(1, 3, 48, 48)}, check_trace=False
    )
    path = tmp_path / "ViT-B-16.pt"
    archive.save(str(path))
    encoder = build_encoder(open_clip_spec(path))
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        for got, want in zip(encoder.forward_grids(pixels), open_clip_grids(tiny_clip.visual, pixels)):
            torch.testing.assert_close(got, want, **TOL)


def test_open_clip_other_image_size_resamples_like_open_clip(tmp_path, tiny_clip):
    path = tmp_path / "clip.safetensors"
    save_file(tiny_clip.state_dict(), str(path))
    encoder = build_encoder(open_clip_spec(path, size=80))
    # open_clip's own resampling of the same checkpoint for an 80x80 tower
    state_dict = dict(tiny_clip.state_dict())
    model = type("M", (), {"visual": encoder.model})  # resize_pos_embed reads model.visual.grid_size
    open_clip.model.resize_pos_embed(state_dict, model)
    assert encoder.model.grid_size == (5, 5)
    torch.testing.assert_close(encoder.model.positional_embedding, state_dict["visual.positional_embedding"])
    pixels = torch.randn(1, 3, 80, 80)
    assert encoder.forward_grids(pixels)[0].shape == (1, 5, 5, 32)


# -- transformers layouts -------------------------------------------------------------------------
def hf_model(model_type: str, **config):
    config = transformers.AutoConfig.for_model(
        model_type, num_hidden_layers=2, hidden_size=32, num_attention_heads=2, **config
    )
    return perturb(transformers.AutoModel.from_config(config))


def hf_grids(model, pixels, num_prefix, interpolate=True):
    kwargs = {"interpolate_pos_encoding": True} if interpolate else {}
    hidden = model(pixels, output_hidden_states=True, **kwargs).hidden_states
    patch = model.config.patch_size
    h, w = pixels.shape[-2] // patch, pixels.shape[-1] // patch
    return [hidden[i + 1][:, num_prefix:].reshape(pixels.shape[0], h, w, -1) for i in (0, 1)]


def test_whole_clip_model_folder_gives_its_vision_tower(tmp_path):
    vision = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
              "image_size": 32, "patch_size": 16}  # fmt: skip
    text = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
            "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}  # fmt: skip
    full = perturb(transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text)))
    full.save_pretrained(tmp_path / "clip")
    folder = str(tmp_path / "clip")
    spec = EncoderSpec(name="clip", source="transformers", model=folder, hooks={"layers": [0, 1]})
    encoder = build_encoder(spec)
    assert type(encoder.model).__name__ == "CLIPVisionModel" and encoder.image_size == (32, 32)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = full.vision_model(pixels, output_hidden_states=True).hidden_states
        for got, index in zip(encoder.forward_grids(pixels), (0, 1)):
            torch.testing.assert_close(got, want[index + 1][:, 1:].reshape(2, 2, 2, 32), **TOL)


def test_legacy_dinov2_layout_file_loads_into_a_model_type(tmp_path):
    model = hf_model("dinov2", patch_size=14, image_size=28)
    legacy = {}
    for key, value in model.state_dict().items():
        for new, old in ((".attention.q_proj.", ".attention.attention.query."),
                         (".attention.k_proj.", ".attention.attention.key."),
                         (".attention.v_proj.", ".attention.attention.value."),
                         (".attention.o_proj.", ".attention.output.dense.")):  # fmt: skip
            key = key.replace(new, old)
        legacy[f"dinov2.{key}"] = value  # as inside a Dinov2ForImageClassification checkpoint
    assert any(".attention.attention.query." in k for k in legacy)
    path = tmp_path / "pytorch_model.bin"
    torch.save(legacy, path)
    spec = EncoderSpec(
        name="dino", source="transformers", model="dinov2", weights=str(path), image_size=(28, 42),
        model_kwargs={"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "patch_size": 14,
                      "image_size": 28}, hooks={"layers": [0, 1]},
    )  # fmt: skip
    encoder = build_encoder(spec)
    pixels = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        for got, want in zip(encoder.forward_grids(pixels), hf_grids(model, pixels, 1, interpolate=False)):
            torch.testing.assert_close(got, want, **TOL)


def test_hf_position_table_of_another_size_is_resampled(tmp_path):
    model = hf_model("clip_vision_model", patch_size=16, image_size=32, intermediate_size=64)
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    spec = EncoderSpec(
        name="clip", source="transformers", model="clip_vision_model", weights=str(path), image_size=64,
        model_kwargs={"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                      "intermediate_size": 64, "patch_size": 16}, hooks={"layers": [0, 1]},
    )  # fmt: skip
    encoder = build_encoder(spec)
    assert encoder.model.embeddings.position_embedding.weight.shape == (17, 32)
    # upsampling 2x2 -> 4x4 at load equals Hugging Face's own interpolation at run time
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(encoder.forward_grids(pixels), hf_grids(model, pixels, 1)):
            torch.testing.assert_close(got, want, **TOL)


# -- caches, offline --------------------------------------------------------------------------------
def test_timm_default_weights_come_from_the_hub_cache_offline(tmp_path, hub_cache, dino_reg):
    path = tmp_path / "model.safetensors"
    save_file(dino_reg.state_dict(), str(path))
    put_in_hub_cache(hub_cache, "timm/vit_small_patch14_reg4_dinov2.lvd142m", {"model.safetensors": path})
    assert_loads_like(spec_for(None), dino_reg)


def test_hf_repo_id_comes_from_the_hub_cache_offline(tmp_path, hub_cache):
    model = hf_model("dinov2_with_registers", patch_size=14, image_size=28, num_register_tokens=4)
    model.save_pretrained(tmp_path / "saved")
    processor = tmp_path / "saved" / "preprocessor_config.json"
    processor.write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6],
                                     "resample": 2, "crop_size": {"height": 28, "width": 28}}))  # fmt: skip
    files = {p.name: p for p in (tmp_path / "saved").iterdir()}
    put_in_hub_cache(hub_cache, "facebook/dinov2-with-registers-tiny", files)
    spec = EncoderSpec(
        name="dino", source="transformers", model="facebook/dinov2-with-registers-tiny",
        hooks={"layers": [0, 1], "prefix": "keep"},
    )  # fmt: skip
    encoder = build_encoder(spec)
    assert (encoder.weights_loaded, encoder.num_prefix_tokens) == ("pretrained", 5)
    assert encoder.preprocessing.mean == (0.1, 0.2, 0.3) and encoder.preprocessing.std == (0.4, 0.5, 0.6)
    assert encoder.preprocessing.interpolation == "bilinear" and encoder.image_size == (28, 28)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        for got, want in zip(encoder.forward_grids(pixels), hf_grids(model, pixels, 5, interpolate=False)):
            torch.testing.assert_close(got, want, **TOL)


# source -> what the error says was looked for
LOOKED_FOR = {
    "timm": r"timm/vit_small_patch14_reg4_dinov2",
    "open_clip": r"tag 'openai'",
    "transformers": r"model type 'dinov2'",
}


@pytest.mark.parametrize("source", list(LOOKED_FOR))
def test_no_weights_offline_raises_or_warns_as_on_missing_says(hub_cache, source):
    model, kwargs = TINY[source]
    looked = LOOKED_FOR[source]
    spec = EncoderSpec(name="enc", source=source, model=model, model_kwargs=kwargs, image_size=28)
    with pytest.raises(FileNotFoundError, match=rf"encoder 'enc'.*offline.*{looked}.*on_missing='random'"):
        build_encoder(spec)
    random_spec = EncoderSpec.from_any({**spec.__dict__, "on_missing": "random"})
    with pytest.warns(UserWarning, match=r"RANDOM WEIGHTS: encoder 'enc'"):
        encoder = build_encoder(random_spec)
    assert encoder.weights_loaded == "random"


def test_random_on_purpose_neither_looks_nor_warns(recwarn):
    encoder = build_encoder(spec_for("random", on_missing="error"))
    assert encoder.weights_loaded == "random"
    assert not [w for w in recwarn if "RANDOM" in str(w.message)]


# -- what can go wrong ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "weights", ["/no/such/dir/dino.safetensors", "./missing.pth", "weights.bin", "~/nope/ckpt.pt"]
)
@pytest.mark.parametrize("source", list(TINY))
def test_missing_weights_path_names_the_path(source, weights):
    model, kwargs = TINY[source]
    spec = EncoderSpec(name="x", source=source, model=model, weights=weights, model_kwargs=kwargs)
    with pytest.raises(FileNotFoundError, match=r"not found: .*" + Path(weights).name):
        build_encoder(spec)


def test_tags_and_repo_ids_are_not_paths(tmp_path):
    assert local_weights_path(None) is None
    assert local_weights_path("openai") is None and local_weights_path("facebook/dinov2-small") is None
    assert local_weights_path(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        local_weights_path("missing.safetensors")


def truncated(tmp_path, dino_reg, suffix) -> Path:
    path = tmp_path / f"whole{suffix}"
    if suffix == ".safetensors":
        save_file(dino_reg.state_dict(), str(path))
    else:
        torch.save(dino_reg.state_dict(), path)
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    return cut


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("source", list(TINY))
def test_truncated_checkpoint_is_a_clear_error(tmp_path, dino_reg, suffix, source):
    path = truncated(tmp_path, dino_reg, suffix)
    model, kwargs = TINY[source]
    spec = EncoderSpec(name="x", source=source, model=model, weights=str(path), model_kwargs=kwargs)
    with pytest.raises(ValueError, match=rf"checkpoint .*cut\{suffix} could not be read: .*truncated"):
        build_encoder(spec)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"this is not a checkpoint", "could not be read"),
        ([torch.zeros(2)], "holds a list, not a state dict"),
        ({"epoch": 3, "note": "no tensors"}, "holds no tensors"),
    ],
)
def test_files_that_hold_no_state_dict(tmp_path, content, message):
    path = tmp_path / "odd.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        read_state_dict(path)


def test_sharded_folder_is_read_whole(tmp_path, dino_reg):
    state_dict = dino_reg.state_dict()
    keys = sorted(state_dict)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: state_dict[k] for k in part}, str(tmp_path / name))
    weight_map = {k: name for name, part in halves.items() for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = read_state_dict(tmp_path)
    assert loaded.keys() == state_dict.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"absent shard.*00002-of-00002"):
        read_state_dict(tmp_path)


def test_folder_without_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("empty")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint found in folder .*model.safetensors"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize(
    "other,message",
    [
        ({"model": "vit_small_patch14_dinov2"}, r"unexpected keys: reg_token"),
        ({"model_kwargs": {**TIMM_KWARGS, "depth": 3}}, r"missing keys: blocks\.2\."),
        ({"model_kwargs": {**TIMM_KWARGS, "embed_dim": 48, "num_heads": 3}}, r"wrong shapes: .*\(checkpoint"),
        # timm's checkpoint filter fails on it; the keys still say what it is
        (
            {"model": "vit_base_patch16_clip_224", "image_size": 32},
            r"does not fit timm model 'vit_base_patch16_clip_224'.*missing keys: norm_pre\.weight.*"
            r"unexpected keys: blocks\.0\.ls1\.gamma.*wrong shapes: pos_embed \(checkpoint \(1, 9, 32\)",
        ),
    ],
)
def test_checkpoint_of_another_architecture_names_offending_keys(tmp_path, dino_reg, other, message):
    path = tmp_path / "dino_reg.safetensors"
    save_file(dino_reg.state_dict(), str(path))
    with pytest.raises(ValueError, match=message):
        build_encoder(spec_for(path, **other))


def test_open_clip_and_transformers_refuse_a_timm_dinov2_checkpoint(tmp_path, dino_reg):
    path = tmp_path / "dino_reg.safetensors"
    save_file(dino_reg.state_dict(), str(path))
    clip = open_clip_spec(path)
    with pytest.raises(ValueError, match=r"does not fit open_clip model 'ViT-B-16'.*missing keys: .*conv1"):
        build_encoder(clip)
    model, kwargs = TINY["transformers"]
    hf = EncoderSpec(name="x", source="transformers", model=model, weights=str(path), model_kwargs=kwargs)
    with pytest.raises(ValueError, match=r"does not fit transformers Dinov2Model.*missing keys: embeddings"):
        build_encoder(hf)
