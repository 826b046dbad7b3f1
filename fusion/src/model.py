"""FusedEncoder: frozen vision encoders read at several layers, fused into tokens for a language model.

The trainable part is :class:`~encoder_fusion.head.FusionHead` (alignment, layer combine, encoder merge,
connector, DeepStack extra token sets); it knows each encoder only by its
:class:`~encoder_fusion.geometry.EncoderGeometry`, so it can be trained on cached features.
:class:`FusedEncoder` adds the encoders, builds from a config, and saves / loads the trained part.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from omegaconf import DictConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from encoder_fusion.align import ALIGNERS
from encoder_fusion.combine import LAYER_COMBINES, check_layer_merge
from encoder_fusion.connector import CONNECTORS
from encoder_fusion.containers import json_ready, plain
from encoder_fusion.deepstack import deepstack_entries
from encoder_fusion.encoders import Encoder, EncoderSpec, build_encoder
from encoder_fusion.encoders.base import as_hw
from encoder_fusion.encoders.weights import check_finite, fit_problems, tensors_sha256
from encoder_fusion.geometry import EncoderGeometry
from encoder_fusion.head import FusionHead
from encoder_fusion.hub import LIBRARY, TAGS, fused_config, model_card, save_folder, weights_file
from encoder_fusion.io import atomic_path
from encoder_fusion.merge import ENCODER_MERGES
from encoder_fusion.tiling import AUTO, Tiler, TilingSpec

CONFIG_FIELDS = (
    "encoders",
    "grid",
    "align",
    "layer_merge",
    "encoder_merge",
    "connector",
    "merge_dim",
    "normalize",
    "deepstack_layers",
    "freeze_encoders",
    "tiling",
)
TRAINED_FORMAT = "encoder-fusion/trained/1"
# Config fields added after files of TRAINED_FORMAT were first written, with the value every file
# written before them was trained with (layer-normalised layers, no DeepStack sets).
ADDED_FIELDS = {"normalize": True, "deepstack_layers": {}, "tiling": None}


def as_spec(entry: Any, index: int) -> EncoderSpec:
    """The spec of entry ``index`` of ``encoders``: a built Encoder's own, or an EncoderSpec or mapping.

    Raises:
        ValueError: prefixed with ``encoders[index]``.
    """
    if isinstance(entry, Encoder):
        return entry.spec
    try:
        return EncoderSpec.from_any(plain(entry))
    except ValueError as error:
        raise ValueError(f"encoders[{index}]: {error}") from None


class FusedEncoder(nn.Module, PyTorchModelHubMixin, library_name=LIBRARY, tags=TAGS):
    """Vision encoders read at several layers and fused into tokens (B, N, D) for a language model.

    ``save_pretrained(folder)`` / ``from_pretrained(folder or repo id)`` / ``push_to_hub(repo_id)``
    (huggingface_hub's mixin) write and read the trained part with its config and a model card; see
    :mod:`encoder_fusion.hub`.

    Args:
        encoders: per encoder an :class:`EncoderSpec`, a mapping of its fields, or a built
            :class:`~encoder_fusion.encoders.Encoder`.
        grid, align, layer_merge, encoder_merge, connector, merge_dim, normalize, deepstack_layers:
            as for :class:`FusionHead`; ``grid=None`` takes the first encoder's grid;
            ``deepstack_layers`` names encoders by ``EncoderSpec.name``.
        freeze_encoders: True (default) keeps the encoders frozen and in eval mode, even under
            ``.train()``; False trains them too.
        tiling: None (default) reads each image whole; a :class:`~encoder_fusion.tiling.TilingSpec`
            or a mapping of its fields (``{"grid": [2, 2], "thumbnail": "last"}``) cuts it into
            tiles, each through the whole pipeline (see :mod:`encoder_fusion.tiling`).

    What the specs alone decide (``normalize``, the hooked layers a ``layer_merge`` needs, the grid
    when given, ``deepstack_layers``) is checked before any encoder is built or loaded.

    Attributes:
        encoders: ``nn.ModuleList`` of :class:`~encoder_fusion.encoders.Encoder`.
        head: the :class:`FusionHead`.

    Raises:
        ValueError: no encoders, a bad spec (message prefixed ``encoders[i]``), or any
            :class:`FusionHead` error.
        FileNotFoundError: weights that cannot be found (``on_missing="error"``).
    """

    def __init__(
        self,
        encoders: Sequence[EncoderSpec | Mapping[str, Any] | Encoder],
        grid: int | Sequence[int] | None = None,
        align: str | Mapping[str, Any] = "bilinear",
        layer_merge: str | Mapping[str, Any] = "weighted_ln",
        encoder_merge: str | Mapping[str, Any] = "channel_concat",
        connector: str | Mapping[str, Any] | None = None,
        merge_dim: int | None = None,
        normalize: bool = True,
        deepstack_layers: Mapping[str, Sequence[int]] | None = None,
        freeze_encoders: bool = True,
        tiling: TilingSpec | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        encoders = plain(encoders)
        if (
            isinstance(encoders, (str, Mapping, Encoder))
            or not isinstance(encoders, Sequence)
            or not encoders
        ):
            raise ValueError(f"encoders must be a non-empty list of encoder specs, got {encoders!r}")
        if not isinstance(freeze_encoders, bool):
            raise ValueError(f"freeze_encoders must be true or false, got {freeze_encoders!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be true or false, got {normalize!r}")
        specs = [as_spec(entry, i) for i, entry in enumerate(encoders)]
        hooks = {spec.name: spec.hooks.layers for spec in specs}
        grid = plain(grid)
        check_layer_merge(
            plain(layer_merge),
            {name: len(layers) for name, layers in hooks.items()},
            None if grid is None else as_hw(grid, "grid"),
        )
        deepstack_layers = plain(deepstack_layers)
        deepstack_entries(deepstack_layers, hooks)
        tiling_spec = None if plain(tiling) is None else TilingSpec.from_any(plain(tiling))
        built = [
            entry if isinstance(entry, Encoder) else build_encoder(spec)
            for entry, spec in zip(encoders, specs)
        ]
        self.encoders = nn.ModuleList(built)
        strategies = {
            "align": ALIGNERS.canonical(plain(align)),
            "layer_merge": LAYER_COMBINES.canonical(plain(layer_merge)),
            "encoder_merge": ENCODER_MERGES.canonical(plain(encoder_merge)),
            "connector": CONNECTORS.canonical("identity" if connector is None else plain(connector)),
            "normalize": normalize,
            "deepstack_layers": {name: list(layers) for name, layers in (deepstack_layers or {}).items()},
        }
        geometries = [EncoderGeometry.of(e) for e in built]
        self.head = FusionHead(geometries, grid=grid, merge_dim=merge_dim, **strategies)
        self.tiler = None if tiling_spec is None else Tiler(tiling_spec, self.head.out_dim)
        self.strategies = strategies
        self.freeze_encoders = freeze_encoders
        self.encoders.requires_grad_(not freeze_encoders)
        self.train(self.training)

    # -- running --------------------------------------------------------------------------------
    @property
    def encoder_list(self) -> Sequence[Encoder]:
        """:attr:`encoders`, typed: a ModuleList yields plain Modules to a type checker."""
        return cast("Sequence[Encoder]", self.encoders)

    def extract(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        """Each encoder's hooked grids for raw ``images`` (B, 3, H, W; uint8 or float in [0, 1]).

        Every encoder resizes and normalises the batch its own way; frozen encoders run without
        autograd.

        Returns:
            ``grids[e][l]``: encoder e's hooked layer l as (B, h_e, w_e, C_e).

        Raises:
            ValueError: a malformed image batch.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoders):
            return [encoder.forward_grids(encoder.preprocess(images)) for encoder in self.encoder_list]

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Fused tokens (B, output_tokens(), head.out_dim) for raw ``images``; with ``tiling``, a
        list of (3, H, W) images of any sizes is accepted too and gives a list of (count_i, D)."""
        if self.tiler is None:  # one batch tensor (extract checks it)
            return self.head(self.extract(cast(torch.Tensor, images)))
        return self.tiler.run(self._fuse, images, self.tile_size, self._patches())[0]

    def forward_deepstack(
        self, images: torch.Tensor | Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor | list[torch.Tensor], list]:
        """The fused tokens, as :meth:`forward`, and the DeepStack extra token sets for raw
        ``images``: one (B, output_tokens(), head.out_dim) tensor per ``deepstack_layers`` entry,
        encoders in model order and each encoder's entries in the order given (an empty list
        without ``deepstack_layers``). A language model adds set ``k`` to the hidden states of its
        decoder layer ``k`` at the visual positions (see :mod:`encoder_fusion.deepstack`); with
        ``tiling``, a separator's position gets zeros."""
        if self.tiler is None:  # one batch tensor (extract checks it)
            return self.head.forward_deepstack(self.extract(cast(torch.Tensor, images)))
        return self.tiler.run(self._fuse_deepstack, images, self.tile_size, self._patches())

    def _fuse(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.head(self.extract(images)), []

    def _fuse_deepstack(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.head.forward_deepstack(self.extract(images))

    def _patches(self) -> dict[str, int]:
        return {encoder.spec.name: encoder.stride for encoder in self.encoder_list}

    @property
    def image_size(self) -> tuple[int, int]:
        """The raw image size this model reads at full resolution: the largest encoder input, times
        the grid of a fixed tiling (each tile then reaches the encoders unresampled)."""
        height = max(encoder.image_size[0] for encoder in self.encoder_list)
        width = max(encoder.image_size[1] for encoder in self.encoder_list)
        if self.tiler is None or self.tiler.spec.grid == AUTO:
            return height, width
        rows, cols = cast("tuple[int, int]", self.tiler.spec.grid)
        return height * rows, width * cols

    @property
    def tile_size(self) -> int:
        """The tile side ``grid="auto"`` compares images against: the largest encoder input side."""
        return max(max(encoder.image_size) for encoder in self.encoder_list)

    def output_tokens(self, image_size: int | Sequence[int] | None = None) -> int:
        """The number of tokens emitted for an image of ``image_size`` (an int or (height, width)).

        Without tiling, or with a fixed grid, every encoder resizes its input (each tile) to its own
        size, so the count does not depend on the size; ``grid="auto"`` chooses the grid from it.

        Raises:
            ValueError: a malformed ``image_size``, or none with ``grid="auto"``.
        """
        size = None if image_size is None else as_hw(image_size, "image_size")
        if self.tiler is None:
            return self.head.output_tokens
        if size is None and self.tiler.spec.grid == AUTO:
            raise ValueError(
                "output_tokens() of a FusedEncoder with tiling grid='auto' depends on the image: "
                "accepted: output_tokens(image_size=(height, width))"
            )
        grid = self.tiler.grid_for(*(size or (1, 1)), self.tile_size)
        return self.tiler.count(grid, self.head.output_tokens)

    def train(self, mode: bool = True) -> FusedEncoder:
        """Set training mode; frozen encoders stay in eval mode."""
        super().train(mode)
        if self.freeze_encoders:
            self.encoders.eval()
        return self

    def weights_status(self) -> dict[str, str]:
        """Each encoder's weights: ``"pretrained"`` or ``"random"``."""
        return {encoder.spec.name: encoder.weights_loaded for encoder in self.encoder_list}

    # -- config ---------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """A plain, JSON-ready dict that :meth:`from_config` accepts; strategies with all options."""
        return json_ready(
            {
                "encoders": [dataclasses.asdict(encoder.spec) for encoder in self.encoder_list],
                "grid": self.head.grid,
                **self.strategies,
                "merge_dim": self.head.merge_dim,
                "freeze_encoders": self.freeze_encoders,
                "tiling": None if self.tiler is None else self.tiler.spec.as_dict(),
            }
        )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | DictConfig) -> FusedEncoder:
        """Build from a dict or OmegaConf node with the fields of :data:`CONFIG_FIELDS`.

        ``encoders`` is required (a list of EncoderSpec fields); the rest default as in
        ``__init__``. A Hydra ``_target_`` key is ignored.

        Raises:
            ValueError: not a mapping, a missing ``encoders``, or an unknown (misspelt) field; the
                message names it and lists the accepted fields.
        """
        data = plain(cfg)
        if not isinstance(data, Mapping):
            raise ValueError(f"FusedEncoder config must be a mapping, got {type(cfg).__name__}")
        data = {key: value for key, value in data.items() if key != "_target_"}
        unknown = sorted(set(data) - set(CONFIG_FIELDS))
        if unknown:
            raise ValueError(
                f"FusedEncoder config has unknown field(s) {unknown}; accepted: {', '.join(CONFIG_FIELDS)}"
            )
        if "encoders" not in data:
            raise ValueError(
                f"FusedEncoder config is missing the field 'encoders'; accepted: {', '.join(CONFIG_FIELDS)}"
            )
        return cls(**data)

    # -- trained parameters ---------------------------------------------------------------------
    def trained_state(self) -> dict[str, torch.Tensor]:
        """The tensors :meth:`save_trained` writes: the head, and the encoders when not frozen."""
        parts: dict[str, nn.Module] = {"head": self.head}
        if self.tiler is not None:
            parts["tiler"] = self.tiler  # its separator token, when it has one
        if not self.freeze_encoders:
            parts["encoders"] = self.encoders
        return {
            f"{prefix}.{key}": tensor
            for prefix, module in parts.items()
            for key, tensor in module.state_dict().items()
        }

    def save_trained(self, path: str | os.PathLike) -> Path:
        """Write the trained tensors to a safetensors file, with :attr:`config` as JSON and a sha256 of
        the tensors in its metadata.

        Only the head is written (and the encoders when ``freeze_encoders=False``), so the file stays
        small; the write is atomic (a temporary file renamed into place).

        Returns:
            The path written.

        Raises:
            ValueError: a folder on the way to ``path`` is a file (named).
            OSError: the file cannot be written (the message names it).
        """
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
            raise ValueError(f"save_trained path={path!r} names no file; accepted: a .safetensors file path")
        path = Path(path)
        if path.is_dir():
            raise ValueError(
                f"save_trained path {path} is a folder; accepted: a file path (save_pretrained takes "
                "a folder)"
            )
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ValueError(
                f"save_trained path {path}: {blocking} is a file, not a folder; accepted: a path whose "
                "parents are folders (or do not exist yet)"
            )
        tensors = {key: tensor.detach().contiguous().clone() for key, tensor in self.trained_state().items()}
        metadata = {
            "format": TRAINED_FORMAT,
            "config": json.dumps(self.config, sort_keys=True),
            "sha256": tensors_sha256(tensors),
        }
        try:
            with atomic_path(path) as temporary:
                save_file(tensors, temporary, metadata=metadata)
        except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
            raise OSError(
                f"save_trained could not write {path}: {getattr(error, 'strerror', None) or error}"
            ) from error
        return path

    def load_trained(self, path: str | os.PathLike) -> FusedEncoder:
        """Load tensors written by :meth:`save_trained` into this model, in place; returns ``self``.

        All or nothing: the file is read and checked whole (format, config, keys, shapes, the
        checksum of its tensors, finite values) before any tensor of the model changes. Build the
        model from the file's config first (``FusedEncoder.from_config(config)``) when it is not at
        hand; the config is in the file's metadata under ``"config"``. A file written before
        checksums were stored (no ``"sha256"`` in its metadata) loads without that check.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: naming the file: not a trained-fusion safetensors file, metadata that does not
                parse, a config that differs from this model's (the differing fields are named),
                tensors that do not fit (a few named), tensors that differ from the checksum written
                with them (the file was altered or damaged), or NaN or Inf values (a few named).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no trained fusion file at {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} is not a safetensors file: {error}") from None
        if metadata.get("format") != TRAINED_FORMAT or "config" not in metadata:
            raise ValueError(
                f"{path} is not a trained-fusion file (metadata format {metadata.get('format')!r}, "
                f"expected {TRAINED_FORMAT!r}); write it with FusedEncoder.save_trained"
            )
        try:
            saved = json.loads(metadata["config"])
            if not isinstance(saved, dict):
                raise ValueError(f"a JSON {type(saved).__name__}, not an object")
        except ValueError as error:
            raise ValueError(f"{path}: its metadata 'config' is not a JSON config ({error})") from None
        saved, current = {**ADDED_FIELDS, **saved}, self.config
        differing = [key for key in CONFIG_FIELDS if saved.get(key) != current.get(key)]
        if differing:
            details = "; ".join(
                f"{key}: file {saved.get(key)!r}, model {current.get(key)!r}" for key in differing
            )
            raise ValueError(f"{path} was trained with a different config ({details})")
        expected = self.trained_state()
        problems = fit_problems(expected, tensors)
        if problems:
            raise ValueError(f"{path} does not fit this model: " + "; ".join(problems))
        if "sha256" in metadata and tensors_sha256(tensors) != metadata["sha256"]:
            raise ValueError(
                f"{path}: its tensors differ from the sha256 written with them; the file was altered or "
                "damaged after it was saved (save it again)"
            )
        check_finite(tensors, str(path))
        with torch.no_grad():
            for key, tensor in expected.items():
                tensor.copy_(tensors[key])
        return self

    # -- the Hub (huggingface_hub's PyTorchModelHubMixin calls these) ----------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        save_folder(self, Path(save_directory))

    def generate_model_card(self, *args: Any, verdict: str | None = None, **kwargs: Any) -> ModelCard:
        """The model card: encoders, hooks, strategy, tokens, and ``verdict`` when given (pass it as
        ``save_pretrained(folder, model_card_kwargs={"verdict": ...})``)."""
        return model_card(self, verdict)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: dict[str, Any] | None = None,
        **init_kwargs: Any,
    ) -> FusedEncoder:
        """Rebuild from the folder's ``config.json`` (the mixin passes it whole as ``config``, and its
        fields again as ``init_kwargs``; the frozen encoders load their own weights), then
        :meth:`load_trained` its tensors: strict, checksummed, all or nothing."""
        fields = fused_config(model_id, config or {})
        path = weights_file(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        return cls.from_config(fields).load_trained(path)
