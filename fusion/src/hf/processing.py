"""The processor: raw images and prompts in, ``input_ids`` with each ``<image>`` expanded to the fused
encoder's token count and ``pixel_values`` out.

The fused encoder preprocesses images itself (every encoder its own resize and mean / std), so the
image processor only brings a batch of images of any sizes to one tensor: resized to ``size`` and
scaled to [0, 1], not normalised. ``size`` defaults to the largest input size among the encoders,
so the encoder that reads the most pixels gets them unresampled a second time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

from transformers import PreTrainedTokenizerBase, ProcessorMixin
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import PILImageResampling, make_flat_list_of_images


class FusedImageProcessor(TorchvisionBackend):
    """Resize to ``size`` (bicubic, antialiased) and scale to [0, 1]; the fused encoder normalises."""

    resample = PILImageResampling.BICUBIC
    size: ClassVar[Any] = {"height": 224, "width": 224}
    do_resize = True
    do_rescale = True
    do_normalize = False
    do_center_crop = False
    do_convert_rgb = True


class FusedLlavaProcessor(ProcessorMixin):
    """A LLaVA-style processor for :class:`~encoder_fusion.hf.FusedLlavaForConditionalGeneration`.

    Args:
        image_processor: a :class:`FusedImageProcessor`.
        tokenizer: the language model's tokenizer, which knows ``image_token``.
        image_token: the placeholder written in prompts, one per image.
        image_tokens: the fused encoder's ``output_tokens()``: what each ``image_token`` expands to.
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
        self.image_tokens = image_tokens
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """Every image is ``image_tokens`` placeholders, whatever its size: each encoder resizes it."""
        return self.image_token * self.image_tokens

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
