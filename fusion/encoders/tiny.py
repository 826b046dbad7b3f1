"""Tiny but real encoders: the real CLIP / DINOv2 / SigLIP architectures cut to a few narrow blocks.

Tests, the ``experiment=smoke`` preset and the notebooks run on these: the same code paths as the
full models (patch sizes, prefix tokens, registers, pre-norms and final norms are the real ones),
with random weights and a forward pass of a batch of 8 in milliseconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusion.encoders.base import SOURCES, EncoderSpec
from fusion.encoders.weights import RANDOM_WEIGHTS
from fusion.hooks import HookSpec

KINDS = ("clip", "dino", "dino_reg", "siglip")
DEPTH, WIDTH, HEADS = 4, 32, 2


@dataclass(frozen=True)
class TinyRecipe:
    """One tiny architecture: the source's model name, its overrides and its input size."""

    model: str
    model_kwargs: dict
    image_size: int


_TIMM = {"depth": DEPTH, "embed_dim": WIDTH, "num_heads": HEADS}
_HF = {"num_hidden_layers": DEPTH, "hidden_size": WIDTH, "num_attention_heads": HEADS}
_HF_MLP = {"intermediate_size": 4 * WIDTH}  # DINOv2 configs take mlp_ratio (default 4) instead
# (source, kind) -> recipe. open_clip ships no DINOv2 towers, so it has no dino kinds.
RECIPES: dict[tuple[str, str], TinyRecipe] = {
    ("timm", "clip"): TinyRecipe("vit_base_patch16_clip_224.openai", _TIMM, 64),
    ("timm", "dino"): TinyRecipe("vit_small_patch14_dinov2.lvd142m", _TIMM, 56),
    ("timm", "dino_reg"): TinyRecipe("vit_small_patch14_reg4_dinov2.lvd142m", _TIMM, 56),
    ("timm", "siglip"): TinyRecipe("vit_base_patch16_siglip_224.webli", _TIMM, 64),
    ("open_clip", "clip"): TinyRecipe("ViT-B-16", {"width": WIDTH, "layers": DEPTH, "heads": HEADS}, 64),
    ("open_clip", "siglip"): TinyRecipe("ViT-B-16-SigLIP", _TIMM, 64),
    ("transformers", "clip"): TinyRecipe("clip_vision_model", {**_HF, **_HF_MLP, "patch_size": 16}, 64),
    ("transformers", "dino"): TinyRecipe("dinov2", {**_HF, "patch_size": 14}, 56),
    ("transformers", "dino_reg"): TinyRecipe(
        "dinov2_with_registers", {**_HF, "patch_size": 14, "num_register_tokens": 4}, 56
    ),
    ("transformers", "siglip"): TinyRecipe("siglip_vision_model", {**_HF, **_HF_MLP, "patch_size": 16}, 64),
}


def tiny_spec(
    kind: str,
    name: str | None = None,
    *,
    source: str = "timm",
    layers: tuple[int, ...] | list[int] = (-1,),
    image_size: int | tuple[int, int] | None = None,
    **hook_fields,
) -> EncoderSpec:
    """An :class:`EncoderSpec` of a tiny random-weights encoder of a real architecture.

    Args:
        kind: ``"clip"``, ``"dino"``, ``"dino_reg"`` (DINOv2 with 4 registers) or ``"siglip"``.
        name: the encoder's label (default: ``kind``).
        source: ``"timm"``, ``"open_clip"`` or ``"transformers"``.
        layers: hooked blocks (the models have 4).
        image_size: input size; default 56 for DINOv2 (patch 14) and 64 for the rest (patch 16),
            both a 4x4 grid.
        **hook_fields: ``norm`` and ``prefix`` of the :class:`~fusion.HookSpec`.

    Raises:
        ValueError: unknown kind or source, or a kind the source does not ship (open_clip DINOv2).
    """
    if kind not in KINDS:
        raise ValueError(f"tiny_spec kind={kind!r} is unknown; accepted: {', '.join(KINDS)}")
    if source not in SOURCES:
        raise ValueError(f"tiny_spec source={source!r} is unknown; accepted: {', '.join(SOURCES)}")
    recipe = RECIPES.get((source, kind))
    if recipe is None:
        offered = [k for (s, k) in RECIPES if s == source]
        raise ValueError(
            f"tiny_spec kind={kind!r} is not offered by source {source!r}; accepted: {', '.join(offered)}"
        )
    return EncoderSpec(
        name=name or kind,
        source=source,
        model=recipe.model,
        weights=RANDOM_WEIGHTS,
        image_size=image_size or recipe.image_size,
        hooks=HookSpec(layers=tuple(layers), **hook_fields),
        on_missing="random",
        model_kwargs=dict(recipe.model_kwargs),
    )
