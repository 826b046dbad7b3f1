"""Tiny but real encoders: the real architectures (CLIP, DINOv2, SigLIP, DINOv3, SigLIP2, Perception
Encoder, C-RADIO, ConvNeXt CLIP) cut to a few narrow blocks or stages.

Tests, the ``experiment=smoke`` preset and the notebooks run on these: the same code paths as the
full models (patch sizes, prefix tokens, registers, rotary positions, pre-norms and final norms are
the real ones), with random weights and a forward pass of a batch of 8 in milliseconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from encoder_fusion.encoders.base import SOURCES, EncoderSpec
from encoder_fusion.encoders.weights import RANDOM_WEIGHTS
from encoder_fusion.hooks import HookSpec

KINDS = (
    "clip",
    "dino",
    "dino_reg",
    "siglip",
    "dinov3",
    "siglip2",
    "naflex_siglip2",
    "pe_core",
    "radio",
    "convnext",
)
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
# four one-block stages, the last WIDTH wide; 128 px gives the last stage (stride 32) a 4x4 grid
_CONVNEXT = {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, WIDTH)}
# (source, kind) -> recipe; a source has the kinds its library builds (open_clip: no DINO towers;
# transformers: no Perception Encoder, C-RADIO or ConvNeXt CLIP; NaFlex SigLIP2 is timm's)
RECIPES: dict[tuple[str, str], TinyRecipe] = {
    ("timm", "clip"): TinyRecipe("vit_base_patch16_clip_224.openai", _TIMM, 64),
    ("timm", "dino"): TinyRecipe("vit_small_patch14_dinov2.lvd142m", _TIMM, 56),
    ("timm", "dino_reg"): TinyRecipe("vit_small_patch14_reg4_dinov2.lvd142m", _TIMM, 56),
    ("timm", "siglip"): TinyRecipe("vit_base_patch16_siglip_224.webli", _TIMM, 64),
    ("timm", "dinov3"): TinyRecipe("vit_small_patch16_dinov3.lvd1689m", _TIMM, 64),
    ("timm", "siglip2"): TinyRecipe("vit_base_patch16_siglip_256.v2_webli", _TIMM, 64),
    ("timm", "naflex_siglip2"): TinyRecipe("naflexvit_base_patch16_siglip.v2_webli", _TIMM, 64),
    ("timm", "pe_core"): TinyRecipe("vit_pe_core_base_patch16_224.fb", _TIMM, 64),
    ("timm", "radio"): TinyRecipe("naflexvit_base_patch16_radio_v3.c_radio", _TIMM, 64),
    ("timm", "convnext"): TinyRecipe("convnext_base.clip_laion2b", _CONVNEXT, 128),
    ("open_clip", "clip"): TinyRecipe("ViT-B-16", {"width": WIDTH, "layers": DEPTH, "heads": HEADS}, 64),
    ("open_clip", "siglip"): TinyRecipe("ViT-B-16-SigLIP", _TIMM, 64),
    ("open_clip", "siglip2"): TinyRecipe("ViT-B-16-SigLIP2-256", _TIMM, 64),
    ("open_clip", "pe_core"): TinyRecipe("PE-Core-B-16", _TIMM, 64),
    ("open_clip", "convnext"): TinyRecipe("convnext_base", _CONVNEXT, 128),
    ("transformers", "clip"): TinyRecipe("clip_vision_model", {**_HF, **_HF_MLP, "patch_size": 16}, 64),
    ("transformers", "dino"): TinyRecipe("dinov2", {**_HF, "patch_size": 14}, 56),
    ("transformers", "dino_reg"): TinyRecipe(
        "dinov2_with_registers", {**_HF, "patch_size": 14, "num_register_tokens": 4}, 56
    ),
    ("transformers", "siglip"): TinyRecipe("siglip_vision_model", {**_HF, **_HF_MLP, "patch_size": 16}, 64),
    ("transformers", "dinov3"): TinyRecipe(
        "dinov3_vit", {**_HF, **_HF_MLP, "patch_size": 16, "num_register_tokens": 4}, 64
    ),
    ("transformers", "siglip2"): TinyRecipe("siglip2_vision_model", {**_HF, **_HF_MLP, "patch_size": 16}, 64),
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
        kind: one of :data:`KINDS`: ``"clip"``, ``"dino"``, ``"dino_reg"`` (DINOv2 with 4
            registers), ``"siglip"``, ``"dinov3"`` (4 registers), ``"siglip2"``, ``"naflex_siglip2"``,
            ``"pe_core"``, ``"radio"`` (C-RADIOv3: 8 summary and register tokens), ``"convnext"``.
        name: the encoder's label (default: ``kind``).
        source: ``"timm"``, ``"open_clip"`` or ``"transformers"``.
        layers: hooked blocks, or stages of the ConvNeXt (the models have 4).
        image_size: input size; default 56 for DINOv2 (patch 14), 128 for the ConvNeXt (stride 32
            at its last stage) and 64 for the rest (patch 16): a 4x4 grid at the last layer.
        **hook_fields: ``norm`` and ``prefix`` of the :class:`~encoder_fusion.HookSpec`.

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
