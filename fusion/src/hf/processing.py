"""The processor: raw images and prompts in, ``input_ids`` with each ``<image>`` expanded to the fused
encoder's token count and ``pixel_values`` out.

The fused encoder preprocesses images itself (every encoder its own resize and mean / std), so the
image processor only brings a batch of images of any sizes to one tensor: resized to ``size`` and
scaled to [0, 1], not normalised. ``size`` defaults to the largest input size among the encoders,
so the encoder that reads the most pixels gets them unresampled a second time.

For a model tiled with ``grid="auto"``, each image keeps its own grid, chosen from its own aspect
ratio as the model chooses it: it is resized to that grid of ``tile_size``-sided tiles, the batch is
padded (bottom and right, with zeros) to its largest image, ``image_sizes`` (B, 2) says where each
image ends, and each ``<image>`` expands to its own image's count.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import PIL.Image
import torch
from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import PILImageResampling, SizeDict, make_flat_list_of_images

from encoder_fusion.images import read_image, shown_rgb
from encoder_fusion.tiling import AUTO, TilingSpec, grid_of, token_count


class FusedImageProcessor(TorchvisionBackend):
    """Resize to ``size`` (bicubic, antialiased) and scale to [0, 1]; the fused encoder normalises.

    Args:
        tiling: the model's tiling fields (``FusedEncoder.config["tiling"]``) when its grid is
            ``"auto"``: each image is then resized to its own grid of ``tile_size`` tiles (see the
            module docstring); None (or a fixed grid) resizes every image to ``size``.
        tile_size: the model's ``tile_size``; needed with an ``"auto"`` tiling.
    """

    resample = PILImageResampling.BICUBIC
    size: ClassVar[Any] = {"height": 224, "width": 224}
    do_resize = True
    do_rescale = True
    do_normalize = False
    do_center_crop = False
    do_convert_rgb = True

    def __init__(self, tiling: dict | None = None, tile_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        spec = None if tiling is None else TilingSpec.from_any(tiling)
        if spec is not None and spec.grid == AUTO and (not isinstance(tile_size, int) or tile_size < 1):
            raise ValueError(
                f"an 'auto' tiling needs tile_size, the model's FusedEncoder.tile_size (an int >= 1), got "
                f"{tile_size!r}"
            )
        self.tiling, self.tile_size = (None if spec is None else spec.as_dict()), tile_size

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Local files (a path string or ``os.PathLike``) are read by the project's reader
        (:func:`encoder_fusion.images.read_image`: EXIF orientation, wide bit depths); URLs go to
        transformers' loader."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(x) for x in image_url_or_urls]
        if isinstance(image_url_or_urls, os.PathLike) or (
            isinstance(image_url_or_urls, str) and not image_url_or_urls.startswith(("http://", "https://"))
        ):
            return read_image(image_url_or_urls)
        return super().fetch_images(image_url_or_urls)

    def process_image(self, image: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A Pillow image is shown as a viewer shows it (:func:`encoder_fusion.images.shown_rgb`)
        before transformers' conversion; tensors and arrays pass as they are."""
        if isinstance(image, PIL.Image.Image):
            image = shown_rgb(image)
        return super().process_image(image, *args, **kwargs)

    def auto_tiling(self) -> TilingSpec | None:
        """The tiling when its grid is chosen per image, else None."""
        spec = None if self.tiling is None else TilingSpec.from_any(self.tiling)
        return spec if spec is not None and spec.grid == AUTO else None

    def _preprocess(self, images: list[torch.Tensor], **kwargs: Any) -> BatchFeature:
        spec = self.auto_tiling()
        if spec is None:
            return super()._preprocess(images, **kwargs)
        tile = cast(int, self.tile_size)
        shown, sizes = [], []
        for image in images:  # each its own size: a batch of one
            rows, cols = grid_of(spec, image.shape[-2], image.shape[-1], tile)
            size = SizeDict(height=rows * tile, width=cols * tile)
            one = super()._preprocess(
                [image], **{**kwargs, "size": size, "do_pad": False, "return_tensors": None}
            )
            shown.append(one["pixel_values"][0])
            sizes.append((rows * tile, cols * tile))
        pixels = shown[0].new_zeros(len(shown), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
        for row, image in enumerate(shown):
            pixels[row, :, : image.shape[-2], : image.shape[-1]] = image
        return BatchFeature(
            data={"pixel_values": pixels, "image_sizes": torch.tensor(sizes)},
            tensor_type=kwargs.get("return_tensors"),
        )


class FusedLlavaProcessor(ProcessorMixin):
    """A LLaVA-style processor for :class:`~encoder_fusion.hf.FusedLlavaForConditionalGeneration`.

    Args:
        image_processor: a :class:`FusedImageProcessor`.
        tokenizer: the language model's tokenizer, which knows ``image_token``.
        image_token: the placeholder written in prompts, one per image.
        image_tokens: the fused encoder's ``output_tokens()``: what each ``image_token`` expands to.
        tile_tokens: with an ``"auto"`` tiling, the tokens of one tile (``fused.head.output_tokens``):
            each image's count is then its own grid's.
        chat_template: as for every transformers processor.

    Prompts of different lengths are padded (on the tokenizer's side) without asking.
    """

    text_kwargs: ClassVar[dict[str, Any]] = {"padding": True}  # transformers' processor defaults

    def __init__(
        self,
        image_processor: FusedImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        image_token: str = "<image>",
        image_tokens: int = 1,
        chat_template: str | None = None,
        tile_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        if tokenizer is None:
            raise ValueError("FusedLlavaProcessor needs the language model's tokenizer; got None")
        if not isinstance(image_tokens, int) or image_tokens < 1:
            raise ValueError(
                "image_tokens must be an int >= 1 (the fused encoder's output_tokens()), "
                f"got {image_tokens!r}"
            )
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_tokens, self.tile_tokens = image_tokens, tile_tokens
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if self.image_processor.auto_tiling() is not None and (
            not isinstance(tile_tokens, int) or tile_tokens < 1
        ):
            raise ValueError(
                "an image processor tiling with grid 'auto' needs tile_tokens, the tokens of one tile "
                f"(fused.head.output_tokens, an int >= 1), got {tile_tokens!r}"
            )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """Every image is ``image_tokens`` placeholders, whatever its size (each encoder resizes it);
        with an ``"auto"`` tiling, its own grid's count."""
        spec = self.image_processor.auto_tiling()
        if spec is None:
            return self.image_token * self.image_tokens
        height, width = (int(side) for side in image_inputs["image_sizes"][image_idx])
        grid = grid_of(spec, height, width, self.image_processor.tile_size)
        return self.image_token * token_count(spec, grid, cast(int, self.tile_tokens))

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs: Any) -> None:
        """Before any image is processed: one ``image_token`` per image given, and, when ``images``
        is a list of lists (the images of each prompt), per prompt.

        Raises:
            ValueError: naming the counts that differ.
        """
        prompts = [text] if isinstance(text, str) else list(text or [])
        found = [prompt.count(self.image_token) for prompt in prompts if isinstance(prompt, str)]
        token = self.image_token
        if images is None and sum(found):
            raise ValueError(
                f"the prompts hold {sum(found)} {token} but no images were given; accepted: one image per "
                f"{token}, or prompts without it"
            )
        if images is not None and prompts:
            grouped = isinstance(images, (list, tuple)) and all(isinstance(g, (list, tuple)) for g in images)
            if grouped:
                groups = cast(Sequence[Sequence[Any]], images)
                if len(groups) != len(prompts):
                    raise ValueError(
                        f"images holds {len(groups)} list(s) of images for {len(prompts)} prompt(s); "
                        "accepted: "
                        "one list per prompt, or a flat list of every prompt's images in order"
                    )
                for index, (count, group) in enumerate(zip(found, groups)):
                    if count != len(group):
                        raise ValueError(
                            f"prompt {index} holds {count} {token} for {len(group)} image(s); accepted: one "
                            f"{token} per image of that prompt"
                        )
            given = len(cast(Sequence[Any], make_flat_list_of_images(images)))
            if sum(found) != given:
                raise ValueError(
                    f"the prompts hold {sum(found)} {token} for {given} image(s); accepted: one {token} per "
                    "image, in the order the images are given"
                )
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)
