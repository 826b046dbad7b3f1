"""What every mode of a run needs before it measures anything: the model hub settled, the process
group joined, the encoders built, each split's pixels identified for the feature cache, the phases
timed, the output folder chosen."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from encoder_fusion import EncoderSpec
from encoder_fusion.benchmarks.datasets import ImageDataset, load_split
from encoder_fusion.benchmarks.features.cache import FeatureCache
from encoder_fusion.benchmarks.features.tiles import stack_regions
from encoder_fusion.encoders import Encoder, build_encoder
from encoder_fusion.tiling import TilingSpec, cut_tiles

log = logging.getLogger(__name__)


HUB_HOST = ("huggingface.co", 443)

HUB_TIMEOUT_S = 3.0


def hub_reachable() -> bool:
    """Whether a TCP connection to huggingface.co opens within a few seconds."""
    try:
        socket.create_connection(HUB_HOST, timeout=HUB_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def configure_hub(mode: str) -> None:
    """Apply ``bench.hub``: ``offline`` (or ``auto`` with the hub out of reach) sets ``HF_HUB_OFFLINE=1``,
    so weight lookups go straight to the local caches instead of waiting on network retries.

    The schema's ``HubMode`` has already refused any other mode.
    """
    if mode == "online" or os.environ.get("HF_HUB_OFFLINE"):
        return
    if mode == "offline" or not hub_reachable():
        log.info("model hub %s not used (bench.hub=%s): HF_HUB_OFFLINE=1", HUB_HOST[0], mode)
        os.environ["HF_HUB_OFFLINE"] = "1"


@contextlib.contextmanager
def phase(name: str, seconds: dict[str, float]) -> Iterator[None]:
    """Log a phase of the run and record its wall time (seconds) under ``name``."""
    log.info("%s ...", name)
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(time.perf_counter() - start, 2)
        log.info("%s took %.1f s", name, seconds[name])


def init_distributed() -> int | None:
    """Join the process group ``torchrun`` describes (gloo, so CPU processes can shard extraction);
    returns this process's rank, or None when running alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank()


def error_text(error: BaseException) -> str:
    """``Type: message`` of an exception, as reports show it."""
    return f"{type(error).__name__}: {error}"


def build_encoders(specs: Mapping[str, EncoderSpec], seed: int) -> dict[str, Encoder]:
    """role -> built encoder; each seeded with ``seed`` so random weights (and their cache
    entries) are the same in every run of one seed.

    Raises:
        ValueError: an encoder that does not build, named by its ``encoders.<role>`` settings.
    """
    encoders = {}
    for role, spec in specs.items():
        torch.manual_seed(seed)
        try:
            encoders[role] = build_encoder(spec)
        except ValueError as error:  # named by the settings that made the spec
            kwargs = f" with encoders.{role}.model_kwargs={spec.model_kwargs}" if spec.model_kwargs else ""
            raise ValueError(f"encoders.{role} ({spec.source} {spec.model}{kwargs}): {error}") from error
    return encoders


def decoded_splits(
    data: Any, train: ImageDataset, test: ImageDataset
) -> dict[str, tuple[ImageDataset, dict, list[dict[str, str]]]]:
    """Every image of the train and test splits decoded at ``data.image_size``, both before any
    encoder runs (so that a bad image in the test split stops the run before the train split is
    extracted), ``data.on_bad_image`` deciding what an unusable image does
    (:func:`encoder_fusion.benchmarks.datasets.load_split`).

    Returns:
        ``{"train": (kept dataset, batch, skipped), "test": ...}``.
    """
    loaded = {}
    for which, dataset in (("train", train), ("test", test)):
        loaded[which] = load_split(dataset, data.image_size, data.on_bad_image)
        for skipped in loaded[which][2]:
            log.warning(
                "skipped an image of the %s split (data.on_bad_image=skip): %s", which, skipped["error"]
            )
    return loaded


def image_source(dataset: ImageDataset, load_size: int, cache: FeatureCache) -> dict:
    """What a split's pixels depend on, for the feature cache key: the dataset's identity, the contents
    of its image files (see :mod:`encoder_fusion.benchmarks.features.fingerprint`) and the load size."""
    return {
        **dataset.identity(),
        "contents": cache.files.digest(dataset.image_paths()),
        "load_size": load_size,
    }


def cached_grids(
    cache: FeatureCache, encoder: Encoder, source: Mapping, batch: dict, *, pool: bool = False
) -> list[torch.Tensor]:
    """``encoder``'s grids of every image of ``batch`` (a split's :func:`load_batch`), from the cache
    or extracted now."""
    images = batch["images"]
    return cache.grids(encoder, source, list(range(len(images))), lambda idx: images[list(idx)], pool=pool)


def tiled_grids(
    cache: FeatureCache,
    encoder: Encoder,
    source: Mapping,
    batch: dict,
    spec: TilingSpec,
    grid: tuple[int, int],
) -> list[torch.Tensor]:
    """``encoder``'s grids of every image of ``batch`` cut by ``grid``, each image's regions stacked
    along the height (:func:`encoder_fusion.benchmarks.features.tiles.stack_regions`): its tiles, then
    the whole image unless ``spec.thumbnail`` is ``none``. The tiles are cached as images of their own
    (keyed by the grid); the whole images are the untiled entry, shared with untiled runs."""
    tiles = cut_tiles(batch["images"], grid)
    tile_grids = cached_grids(cache, encoder, {**source, "tiles": list(grid)}, {"images": tiles})
    wholes = cached_grids(cache, encoder, source, batch) if spec.thumbnail != "none" else None
    return [
        stack_regions(layer, None if wholes is None else wholes[number], grid)
        for number, layer in enumerate(tile_grids)
    ]


def output_dir(cfg: Any, out_dir: str | os.PathLike | None) -> Path:
    """``out_dir``, else ``bench.out_dir``, else the Hydra run folder, else ``outputs/<date>/<time>``."""
    chosen = out_dir or cfg.bench.out_dir
    if chosen is None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            chosen = HydraConfig.get().runtime.output_dir
        else:
            chosen = Path("outputs") / datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    return Path(chosen)


def job_overrides() -> list[str]:
    """The command-line overrides of this Hydra job (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
