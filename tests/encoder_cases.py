"""Each source library's reference for the encoder and weight tests: a tiny random model of a real
architecture (the recipes of encoder_fusion.encoders.tiny), perturbed and saved as a checkpoint, the
EncoderSpec that loads it, and the library's own intermediate outputs of that model.
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

from encoder_fusion.encoders import EncoderSpec
from encoder_fusion.encoders.tiny import RECIPES

PREFIX_TOKENS = {
    "clip": 1, "dino": 1, "dino_reg": 5, "siglip": 0, "dinov3": 5, "siglip2": 0, "naflex_siglip2": 0,
    "pe_core": 1, "radio": 8, "convnext": 0,
}  # fmt: skip
# non-square inputs: a 3x5 grid at patch 14 or 16, and at the ConvNeXt's last stage (stride 32)
SIZES = {kind: (48, 80) for kind in PREFIX_TOKENS} | {
    "dino": (42, 70),
    "dino_reg": (42, 70),
    "convnext": (96, 160),
}
# models without a final norm for every hooked layer: C-RADIO has none; a CLIP ConvNeXt norms after pooling
NO_POST_NORM = {"radio", "convnext"}
# timm models that take any input size as built; the others are built for the size they are fed
ANY_SIZE = {"naflex_siglip2", "radio", "convnext"}
HF_FINAL_NORMS = {"dino": "layernorm", "dino_reg": "layernorm", "dinov3": "norm"}  # else post_layernorm


def split_reference(grids, prefixes, num_prefix):
    """Library NCHW grids -> (B, h, w, C) grids; prefixes or an empty (B, 0, C) tensor."""
    grids = [g.permute(0, 2, 3, 1) for g in grids]
    if prefixes is None:
        prefixes = [g.new_zeros(g.shape[0], 0, g.shape[-1]) for g in grids]
    assert all(p.shape[1] == num_prefix for p in prefixes)
    return list(zip(grids, prefixes))


def spec_of(source, kind, path, hooks):
    recipe = RECIPES[source, kind]
    return EncoderSpec(
        name=kind, source=source, model=recipe.model, weights=str(path), image_size=SIZES[kind],
        model_kwargs=recipe.model_kwargs, hooks=hooks,
    )  # fmt: skip


# -- references: (spec, reference(pixels, indices, norm) -> [(grid, prefix)]) per source ---------
def timm_case(tmp_path, kind, hooks):
    recipe = RECIPES["timm", kind]
    sized = {} if kind in ANY_SIZE else {"img_size": SIZES[kind]}
    model = timm.create_model(recipe.model, pretrained=False, num_classes=0, **sized, **recipe.model_kwargs)
    model = perturb(model)
    path = tmp_path / "timm.safetensors"
    save_file(model.state_dict(), str(path))
    num_prefix = PREFIX_TOKENS[kind]

    def reference(pixels, indices, norm):
        extra = {"return_prefix_tokens": True} if num_prefix else {}
        out = model.forward_intermediates(
            pixels, indices=indices, norm=norm, intermediates_only=True, **extra
        )
        if num_prefix:
            return split_reference([o[0] for o in out], [o[1] for o in out], num_prefix)
        return split_reference(out, None, 0)

    return spec_of("timm", kind, path, hooks), reference


def open_clip_case(tmp_path, kind, hooks):
    recipe, size = RECIPES["open_clip", kind], SIZES[kind]
    config = open_clip.get_model_config(recipe.model)
    if kind == "clip":
        vision = {**config["vision_cfg"], "width": 32, "layers": 4, "head_width": 16, "image_size": size}
        text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
        clip = open_clip.create_model(recipe.model, pretrained=None, vision_cfg=vision, text_cfg=text)
        tower = perturb(clip.visual)
        # a full CLIP checkpoint as training scripts write it: wrapped, with a DDP prefix
        checkpoint = {"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}
        path = tmp_path / "open_clip.pt"
        torch.save(checkpoint, path)
    else:
        # open_clip's TimmModel forwards no architecture arguments: shrink its timm trunk here
        tiny_timm = types.SimpleNamespace(
            create_model=functools.partial(timm.create_model, **recipe.model_kwargs)
        )
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(open_clip.timm_model, "timm", tiny_timm)
            tower = open_clip.model._build_vision_tower(config["embed_dim"], config["vision_cfg"])
        if kind not in ANY_SIZE:
            tower.set_input_size(size)
        tower = perturb(tower)
        path = tmp_path / "open_clip.safetensors"
        save_file({f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}, str(path))
    num_prefix = PREFIX_TOKENS[kind]

    def reference(pixels, indices, norm):
        out = tower.forward_intermediates(
            pixels, indices=indices, normalize_intermediates=norm, intermediates_only=True,
            output_extra_tokens=num_prefix > 0,
        )  # fmt: skip
        return split_reference(out["image_intermediates"], out.get("image_intermediates_prefix"), num_prefix)

    return spec_of("open_clip", kind, path, hooks), reference


def hf_inputs(kind, pixels, patch):
    """The model inputs as the library's own image processing makes them."""
    if kind == "siglip2":  # its NaFlex processor, with the pixels already resized and normalised
        grid = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
        processor = transformers.Siglip2ImageProcessor(patch_size=patch, max_num_patches=grid)
        kwargs = {"do_resize": False, "do_rescale": False, "do_normalize": False, "return_tensors": "pt"}
        return dict(processor(list(pixels), **kwargs))
    interpolate = {} if kind.startswith("dino") else {"interpolate_pos_encoding": True}
    return {"pixel_values": pixels, **interpolate}


def transformers_case(tmp_path, kind, hooks):
    recipe, size = RECIPES["transformers", kind], SIZES[kind]
    config = transformers.AutoConfig.for_model(recipe.model, **recipe.model_kwargs)
    if hasattr(config, "image_size"):
        config.image_size = size[0]
    model = perturb(transformers.AutoModel.from_config(config))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    spec = EncoderSpec(name=kind, source="transformers", model=str(folder), image_size=size, hooks=hooks)
    final_norm = getattr(model, HF_FINAL_NORMS.get(kind, "post_layernorm"))
    num_prefix = PREFIX_TOKENS[kind]

    def reference(pixels, indices, norm):
        hidden = model(**hf_inputs(kind, pixels, config.patch_size), output_hidden_states=True).hidden_states
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
