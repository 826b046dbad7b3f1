"""Weights of the DINOv3, SigLIP2, Perception Encoder, C-RADIO and ConvNeXt CLIP families: their
original release files, converted by timm's checkpoint filters, and the offline caches of every library.

Each file is written here from a tiny random model under the release's own key names; it counts as
loaded when the encoder's grids equal the library's own intermediates of the model it came from.
"""

from __future__ import annotations

import pytest
import timm
import torch
from checkpoints import perturb, put_in_hub_cache
from encoder_cases import CASES
from safetensors.torch import save_file

from encoder_fusion.encoders import EncoderSpec, build_encoder
from encoder_fusion.hooks import HookSpec

TIMM_KWARGS = {"depth": 2, "embed_dim": 32, "num_heads": 2}
SIZE = (48, 80)
HOOKS = {"layers": [0, 1], "prefix": "keep"}
TOL = {"rtol": 1e-5, "atol": 1e-5}


def assert_loads_like(spec: EncoderSpec, model: torch.nn.Module) -> None:
    """The encoder built from ``spec`` gives ``model``'s own intermediates, prefix tokens included."""
    encoder = build_encoder(spec)
    assert encoder.weights_loaded == "pretrained"
    pixels = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        want = model.forward_intermediates(pixels, [0, 1], return_prefix_tokens=True, intermediates_only=True)
        for got, (grid, prefix) in zip(encoder.forward_tokens(pixels), want):
            torch.testing.assert_close(got.grid, grid.permute(0, 2, 3, 1), **TOL)
            torch.testing.assert_close(got.prefix, prefix, **TOL)


def timm_spec(model: str, path) -> EncoderSpec:
    return EncoderSpec(
        name="enc", source="timm", model=model, weights=str(path), image_size=SIZE, model_kwargs=TIMM_KWARGS,
        hooks=HOOKS,
    )  # fmt: skip


def dinov3_release(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm DINOv3 state dict under the key names of the facebookresearch/dinov3 release files."""
    original = {"mask_token": torch.zeros(1, 32), "rope_embed.periods": torch.rand(4)}
    for key, value in model.state_dict().items():
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma")
        original[key.replace("gamma_2", "ls2.gamma")] = value
    for block in range(TIMM_KWARGS["depth"]):
        prefix = f"blocks.{block}.attn."
        q_bias = original.pop(prefix + "q_bias", torch.zeros(32))
        v_bias = original.pop(prefix + "v_bias", torch.zeros(32))
        # one qkv bias whose key third is masked to zero; models without biases were released with zeros
        original[prefix + "qkv.bias"] = torch.cat([q_bias, torch.zeros(32), v_bias])
        original[prefix + "qkv.bias_mask"] = torch.cat([torch.ones(32), torch.zeros(32), torch.ones(32)])
    return original


@pytest.mark.parametrize("model", ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb"])
def test_original_dinov3_release_loads_through_timms_filter(tmp_path, model):
    dinov3 = perturb(timm.create_model(model, img_size=SIZE, num_classes=0, **TIMM_KWARGS))
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(dinov3_release(dinov3), path)
    assert_loads_like(timm_spec(model, path), dinov3)


def test_original_c_radio_file_loads_through_timms_filter(tmp_path):
    radio = perturb(timm.create_model("naflexvit_base_patch16_radio_v3", num_classes=0, **TIMM_KWARGS))
    with torch.no_grad():
        radio.embeds.proj.bias.zero_()  # RADIO's patch embedding is a linear map without bias
    timm_keys = radio.state_dict()
    # NVIDIA's layout: the patch map over (channel, row, column) where timm's is over (row, column,
    # channel); one summary token per teacher, then the registers, in one table
    embedder = timm_keys.pop("embeds.proj.weight").reshape(32, 16, 16, 3).permute(0, 3, 1, 2).reshape(32, -1)
    tokens = torch.cat([timm_keys.pop("embeds.cls_token")[0], timm_keys.pop("embeds.reg_token")[0]])
    original = {
        "radio_model.model.patch_generator.embedder.weight": embedder,
        "radio_model.model.patch_generator.pos_embed": timm_keys.pop("embeds.pos_embed").reshape(1, -1, 32),
        "radio_model.model.patch_generator.cls_token.token": tokens,
        "radio_model.input_conditioner.norm_mean": torch.rand(3, 1, 1),
        "radio_model.summary_idxs": torch.arange(3),
    }
    timm_keys.pop("embeds.proj.bias")
    original |= {f"radio_model.model.{k}": v for k, v in timm_keys.items()}
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    assert_loads_like(timm_spec("naflexvit_base_patch16_radio_v3", path), radio)


# (source, kind) -> the hub repo its default weights are cached under, and the files it holds
CACHED = {
    ("timm", "dinov3"): "timm/vit_small_patch16_dinov3.lvd1689m",
    ("timm", "siglip2"): "timm/vit_base_patch16_siglip_256.v2_webli",
    ("timm", "pe_core"): "timm/vit_pe_core_base_patch16_224.fb",
    ("timm", "radio"): "timm/naflexvit_base_patch16_radio_v3.c_radio",
    ("timm", "convnext"): "timm/convnext_base.clip_laion2b",
    ("open_clip", "siglip2"): "timm/ViT-B-16-SigLIP2-256",
    ("open_clip", "pe_core"): "timm/PE-Core-B-16",
    ("open_clip", "convnext"): "laion/CLIP-convnext_base-laion400M-s13B-b51K",
    ("transformers", "dinov3"): "facebook/dinov3-vits16-pretrain-lvd1689m",
    ("transformers", "siglip2"): "google/siglip2-base-patch16-naflex",
}
CACHE_FILES = {"timm": "model.safetensors", "open_clip": "open_clip_model.safetensors"}


@pytest.mark.parametrize("source,kind", sorted(CACHED))
def test_default_weights_of_every_family_come_from_the_hub_cache_offline(tmp_path, hub_cache, source, kind):
    spec, reference = CASES[source](tmp_path, kind, HookSpec(layers=(0, 1), prefix="keep"))
    repo = CACHED[source, kind]
    written = {"timm": tmp_path / "timm.safetensors", "open_clip": tmp_path / "open_clip.safetensors"}
    if source == "transformers":  # a model folder in the hub layout (DINOv3: "layer.0..." keys)
        files, cached = {p.name: p for p in (tmp_path / "hf").iterdir()}, {"model": repo}
    else:
        files, cached = {CACHE_FILES[source]: written[source]}, {"weights": None}
    put_in_hub_cache(hub_cache, repo, files)
    encoder = build_encoder(EncoderSpec.from_any({**spec.__dict__, **cached, "on_missing": "error"}))
    assert encoder.weights_loaded == "pretrained"
    pixels = torch.randn(2, 3, *encoder.image_size)
    with torch.no_grad():
        for got, (grid, prefix) in zip(encoder.forward_tokens(pixels), reference(pixels, [0, 1], False)):
            torch.testing.assert_close(got.grid, grid, **TOL)
            torch.testing.assert_close(got.prefix, prefix, **TOL)
