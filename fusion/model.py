"""FusedEncoder: frozen vision encoders read at several layers, fused into tokens for a language model.

The trainable part is :class:`FusionHead` (alignment, layer combine, encoder merge, connector); it
knows each encoder only by its :class:`EncoderGeometry`, so it can be trained on cached features.
:class:`FusedEncoder` adds the encoders, builds from a config, and saves / loads the trained part.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import nn

import kernels
from fusion.align import ALIGNERS, build_aligner
from fusion.connector import CONNECTORS, build_connector
from fusion.encoders import Encoder, EncoderSpec, build_encoder
from fusion.encoders.base import as_hw
from fusion.merge import ENCODER_MERGES, LAYER_COMBINES, LN_EPS, build_encoder_merge, build_layer_combine

CONFIG_FIELDS = (
    "encoders",
    "grid",
    "align",
    "layer_merge",
    "encoder_merge",
    "connector",
    "merge_dim",
    "freeze_encoders",
)
TRAINED_FORMAT = "encoder-fusion/trained/1"


@dataclasses.dataclass(frozen=True)
class EncoderGeometry:
    """What the trainable head needs to know of one encoder.

    Args:
        name: the encoder's label (unique within a head).
        width: channels of its hooked layers.
        grid: its token grid (h, w).
        num_layers: how many layers it hooks.

    Raises:
        ValueError: an empty name, a non-positive width or layer count, or a malformed grid.
    """

    name: str
    width: int
    grid: tuple[int, int]
    num_layers: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"EncoderGeometry.name must be a non-empty string, got {self.name!r}")
        for field in ("width", "num_layers"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"EncoderGeometry.{field} of encoder {self.name!r} must be a positive int, got {value!r}"
                )
        object.__setattr__(self, "grid", as_hw(self.grid, f"EncoderGeometry.grid of encoder {self.name!r}"))


class FusionHead(nn.Module):
    """The trainable part: align each hooked layer to ``grid``, combine each encoder's layers, merge
    the encoders, project with the connector.

    Args:
        geometries: one :class:`EncoderGeometry` per encoder, in merge order.
        grid: the target grid (H, W) or an int; None takes the first encoder's grid.
        align: an alignment mode of :mod:`fusion.align` (a name or ``{"kind": ..., **options}``).
        layer_merge: a layer combine of :mod:`fusion.merge`.
        encoder_merge: an encoder merge of :mod:`fusion.merge`.
        connector: a connector config of :mod:`fusion.connector` (None: identity).
        merge_dim: when set, each encoder's combined grid is projected by a Linear to this width
            before the merge; merges other than ``channel_concat`` need it when widths differ.

    Every layer combine layer-normalises each aligned layer over channels (``last`` and ``mean``
    included, without affine; see :mod:`fusion.merge`), so encoders of different scale meet on
    equal footing. With ``channel_concat``, no ``merge_dim`` and an alignment that
    ``kernels.grid_fuse`` supports (bilinear, nearest, area), alignment, layer combine and encoder
    merge of every encoder run as ONE ``kernels.grid_fuse`` call (``fused_route`` is True);
    otherwise each encoder's layers are aligned by its aligner and combined by one ``grid_fuse``
    call on the aligned grids. Both routes compute the same function.

    Attributes:
        grid: the target grid (H, W); geometries: the encoders' geometries; fused_route: whether
            forward takes the one-call ``grid_fuse`` route; aligners, combines, projections, merge,
            connector: the stages, one aligner / combine / projection per encoder.

    Raises:
        ValueError: no geometries, repeated names, a bad grid or ``merge_dim``, unknown strategy
            names or options, grids one alignment cannot align, encoder widths a merge cannot take.
    """

    def __init__(
        self,
        geometries: Sequence[EncoderGeometry],
        grid: int | Sequence[int] | None = None,
        align: str | Mapping[str, Any] = "bilinear",
        layer_merge: str | Mapping[str, Any] = "weighted_ln",
        encoder_merge: str | Mapping[str, Any] = "channel_concat",
        connector: str | Mapping[str, Any] | None = None,
        merge_dim: int | None = None,
    ) -> None:
        super().__init__()
        geometries = list(geometries)
        if not geometries or not all(isinstance(g, EncoderGeometry) for g in geometries):
            raise ValueError(f"FusionHead needs a non-empty list of EncoderGeometry, got {geometries!r}")
        names = [g.name for g in geometries]
        if len(set(names)) != len(names):
            raise ValueError(f"encoder names must be unique within one fused model, got {names}")
        if merge_dim is not None and (
            not isinstance(merge_dim, int) or isinstance(merge_dim, bool) or merge_dim <= 0
        ):
            raise ValueError(f"merge_dim must be None or a positive int, got {merge_dim!r}")
        self.geometries = geometries
        self.grid = as_hw(geometries[0].grid if grid is None else grid, "grid")
        self.merge_dim = merge_dim
        self.aligners = nn.ModuleList(build_aligner(align, g.width, g.grid, self.grid) for g in geometries)
        self.combines = nn.ModuleList(
            build_layer_combine(layer_merge, g.width, aligner.out_dim, g.num_layers)
            for g, aligner in zip(geometries, self.aligners)
        )
        self.projections = nn.ModuleList(
            nn.Identity() if merge_dim is None else nn.Linear(combine.out_dim, merge_dim)
            for combine in self.combines
        )
        widths = [c.out_dim if merge_dim is None else merge_dim for c in self.combines]
        self.merge = build_encoder_merge(encoder_merge, names, widths, self.grid)
        self.connector = build_connector(connector, self.merge.out_dim)
        align_kind = ALIGNERS.kind(align)
        self.fused_route = (
            align_kind in kernels.MODES
            and ENCODER_MERGES.kind(encoder_merge) == "channel_concat"
            and merge_dim is None
        )
        self.fuse_mode = align_kind

    @property
    def output_tokens(self) -> int:
        """The number of tokens ``forward`` emits per image."""
        return self.merge.output_tokens

    @property
    def out_dim(self) -> int:
        """The width of the emitted tokens (the connector's ``out_dim``)."""
        return self.connector.out_dim

    def check_grids(self, grids: Sequence[Sequence[torch.Tensor]]) -> None:
        """Raise a ValueError naming the encoder and layer when ``grids`` does not fit the geometries."""
        if len(grids) != len(self.geometries):
            raise ValueError(
                f"FusionHead expects one list of layer grids per encoder "
                f"({len(self.geometries)}: {[g.name for g in self.geometries]}), got {len(grids)}"
            )
        batch = None
        for geometry, layers in zip(self.geometries, grids):
            if isinstance(layers, torch.Tensor) or len(layers) != geometry.num_layers:
                count = "a tensor" if isinstance(layers, torch.Tensor) else f"{len(layers)} grids"
                raise ValueError(
                    f"encoder {geometry.name!r} hooks {geometry.num_layers} layer(s) but got {count}; "
                    "give a list of (B, h, w, C) grids per encoder"
                )
            expected = (*geometry.grid, geometry.width)
            for index, layer in enumerate(layers):
                if (
                    not isinstance(layer, torch.Tensor)
                    or layer.ndim != 4
                    or tuple(layer.shape[1:]) != expected
                ):
                    shape = tuple(layer.shape) if isinstance(layer, torch.Tensor) else type(layer).__name__
                    raise ValueError(
                        f"encoder {geometry.name!r} layer {index} has shape {shape}; expected "
                        f"(B, {expected[0]}, {expected[1]}, {expected[2]}) from its geometry"
                    )
                batch = layer.shape[0] if batch is None else batch
                if layer.shape[0] != batch:
                    raise ValueError(
                        f"encoder {geometry.name!r} layer {index} has batch size {layer.shape[0]}, "
                        f"another grid has {batch}; all grids must share the batch"
                    )

    def forward(self, grids: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """Fuse the hooked grids: ``grids[e][l]`` is encoder e's hooked layer l as (B, h, w, C).

        Returns:
            (B, output_tokens, out_dim).

        Raises:
            ValueError: grids that do not match the geometries (count, shape, batch).
        """
        self.check_grids(grids)
        if self.fused_route:
            tokens = self.forward_fused(grids)
        else:
            combined = [
                projection(combine(layers, aligner))
                for aligner, combine, projection, layers in zip(
                    self.aligners, self.combines, self.projections, grids
                )
            ]
            tokens = self.merge(combined)
        return self.connector(tokens)

    def forward_fused(self, grids: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """Align, combine and channel-concat every encoder in one ``kernels.grid_fuse`` call."""
        sources, groups, weights, ln_weight, ln_bias = [], [], [], [], []
        first_slot = 0
        for combine, layers in zip(self.combines, grids):
            inputs = combine.fuse_inputs(layers)
            sources += inputs.sources
            groups += [first_slot + slot for slot in inputs.slots]
            weights.append(inputs.weights)
            ln_weight += inputs.ln_weight or [None] * len(inputs.sources)
            ln_bias += inputs.ln_bias or [None] * len(inputs.sources)
            first_slot += combine.num_slots
        # under autocast one encoder may arrive in bf16 and another in fp32; grid_fuse takes one dtype
        dtype = functools.reduce(torch.promote_types, (s.dtype for s in sources))
        return kernels.grid_fuse(
            [s.to(dtype) for s in sources],
            self.grid,
            groups=groups,
            layer_weights=torch.cat(weights),
            ln_weight=ln_weight if any(w is not None for w in ln_weight) else None,
            ln_bias=ln_bias if any(b is not None for b in ln_bias) else None,
            mode=self.fuse_mode,
            eps=LN_EPS,
        )

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map output tokens (B, output_tokens, D') back onto the target grid: (B, H, W, D').

        A reshape for one token per location; for ``sequence_concat`` and ``interleave`` the mean
        of the encoders' tokens at each location.

        Raises:
            ValueError: not (B, output_tokens, D').
        """
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[1] != self.output_tokens:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"to_grid takes tokens (B, {self.output_tokens}, D), got {shape}")
        return self.merge.to_grid(tokens)

    def layer_weights(self) -> dict[str, list[float]]:
        """Each encoder's softmax-normalised learned layer weights (``weighted_ln``); else empty."""
        learned = {g.name: c.learned_weights() for g, c in zip(self.geometries, self.combines)}
        return {name: weights for name, weights in learned.items() if weights is not None}


def plain(value: Any) -> Any:
    """An OmegaConf node as plain Python containers (anything else unchanged)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def json_ready(value: Any) -> Any:
    """Tuples to lists, recursively, so a config survives a JSON round trip unchanged."""
    if isinstance(value, Mapping):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def as_encoder(entry: Any, index: int) -> Encoder:
    """Build entry ``index`` of ``encoders``: an Encoder as is, an EncoderSpec or mapping via build_encoder.

    Raises:
        ValueError: prefixed with ``encoders[index]``.
    """
    if isinstance(entry, Encoder):
        return entry
    try:
        spec = EncoderSpec.from_any(plain(entry))
    except ValueError as error:
        raise ValueError(f"encoders[{index}]: {error}") from None
    return build_encoder(spec)


class FusedEncoder(nn.Module):
    """Vision encoders read at several layers and fused into tokens (B, N, D) for a language model.

    Args:
        encoders: per encoder an :class:`EncoderSpec`, a mapping of its fields, or a built
            :class:`~fusion.encoders.Encoder`.
        grid, align, layer_merge, encoder_merge, connector, merge_dim: as for :class:`FusionHead`;
            ``grid=None`` takes the first encoder's grid.
        freeze_encoders: True (default) keeps the encoders frozen and in eval mode, even under
            ``.train()``; False trains them too.

    Attributes:
        encoders: ``nn.ModuleList`` of :class:`~fusion.encoders.Encoder`.
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
        freeze_encoders: bool = True,
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
        self.encoders = nn.ModuleList(as_encoder(entry, i) for i, entry in enumerate(encoders))
        geometries = [
            EncoderGeometry(e.spec.name, e.width, e.grid_size(), len(e.layer_indices)) for e in self.encoders
        ]
        strategies = {
            "align": ALIGNERS.canonical(plain(align)),
            "layer_merge": LAYER_COMBINES.canonical(plain(layer_merge)),
            "encoder_merge": ENCODER_MERGES.canonical(plain(encoder_merge)),
            "connector": CONNECTORS.canonical("identity" if connector is None else plain(connector)),
        }
        self.head = FusionHead(geometries, grid=plain(grid), merge_dim=merge_dim, **strategies)
        self.strategies = strategies
        self.freeze_encoders = freeze_encoders
        self.encoders.requires_grad_(not freeze_encoders)
        self.train(self.training)

    # -- running --------------------------------------------------------------------------------
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
            return [encoder.forward_grids(encoder.preprocess(images)) for encoder in self.encoders]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Fused tokens (B, output_tokens(), head.out_dim) for raw ``images``."""
        return self.head(self.extract(images))

    def output_tokens(self, image_size: int | Sequence[int] | None = None) -> int:
        """The number of tokens emitted per image.

        Every encoder resizes its input to its own size, so the count does not depend on the raw
        ``image_size``; it is checked and accepted for symmetry with the benchmark harness.

        Raises:
            ValueError: a malformed ``image_size``.
        """
        if image_size is not None:
            as_hw(image_size, "image_size")
        return self.head.output_tokens

    def train(self, mode: bool = True) -> FusedEncoder:
        """Set training mode; frozen encoders stay in eval mode."""
        super().train(mode)
        if self.freeze_encoders:
            self.encoders.eval()
        return self

    def weights_status(self) -> dict[str, str]:
        """Each encoder's weights: ``"pretrained"`` or ``"random"``."""
        return {encoder.spec.name: encoder.weights_loaded for encoder in self.encoders}

    # -- config ---------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """A plain, JSON-ready dict that :meth:`from_config` accepts; strategies with all options."""
        return json_ready(
            {
                "encoders": [dataclasses.asdict(encoder.spec) for encoder in self.encoders],
                "grid": self.head.grid,
                **self.strategies,
                "merge_dim": self.head.merge_dim,
                "freeze_encoders": self.freeze_encoders,
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
        parts = (
            {"head": self.head} if self.freeze_encoders else {"head": self.head, "encoders": self.encoders}
        )
        return {
            f"{prefix}.{key}": tensor
            for prefix, module in parts.items()
            for key, tensor in module.state_dict().items()
        }

    def save_trained(self, path: str | os.PathLike) -> Path:
        """Write the trained tensors to a safetensors file, with :attr:`config` as JSON in its metadata.

        Only the head is written (and the encoders when ``freeze_encoders=False``), so the file stays
        small; the write is atomic (a temporary file renamed into place).

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {key: tensor.detach().contiguous().clone() for key, tensor in self.trained_state().items()}
        metadata = {"format": TRAINED_FORMAT, "config": json.dumps(self.config, sort_keys=True)}
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            save_file(tensors, temporary, metadata=metadata)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return path

    def load_trained(self, path: str | os.PathLike) -> FusedEncoder:
        """Load tensors written by :meth:`save_trained` into this model, in place; returns ``self``.

        Build the model from the file's config first (``FusedEncoder.from_config(config)``) when
        it is not at hand; the config is in the file's metadata under ``"config"``.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: not a trained-fusion safetensors file, a config that differs from this
                model's (the differing fields are named), or tensors that do not fit.
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
        saved, current = json.loads(metadata["config"]), self.config
        differing = [key for key in CONFIG_FIELDS if saved.get(key) != current.get(key)]
        if differing:
            details = "; ".join(
                f"{key}: file {saved.get(key)!r}, model {current.get(key)!r}" for key in differing
            )
            raise ValueError(f"{path} was trained with a different config ({details})")
        expected = self.trained_state()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path} does not fit this model: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for key, tensor in expected.items():
                if tensor.shape != tensors[key].shape:
                    raise ValueError(
                        f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                        f"the model needs {tuple(tensor.shape)}"
                    )
                tensor.copy_(tensors[key])
        return self
