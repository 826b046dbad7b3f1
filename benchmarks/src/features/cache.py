"""Feature cache: the hooked grids of a frozen encoder, computed once per key and reused.

Encoders are frozen, so the grids they return for one dataset never change. A sweep over fusion
strategies reads them from here instead of running the backbone again. An entry is keyed by everything
that changes the grids: the encoder (source, model, and a digest of its parameters as loaded, whatever
file or cache they came from), the architecture overrides, the input size, the hooked layers, norm and
prefix policy, the preprocessing, the images (the caller's ``source``: for
:mod:`encoder_fusion.benchmarks.run.compare`, the dataset's identity and the contents of its image files,
see :mod:`encoder_fusion.benchmarks.features.fingerprint`), the load size, the sample indices, the
storage dtype and whether the grids are stored pooled (``pool=True``: each layer's tokens averaged to one
``(1, 1, C)`` cell as each batch is extracted, for probes that read only the mean token; memory per entry
is then ``samples x layers x C`` values instead of ``samples x layers x h x w x C``).

Layout of one entry ``<root>/<model>-<digest>/``::

    shard-00000.safetensors   tensors "layer0", "layer1", ... for a run of samples, (n, h, w, C)
    shard-00001.safetensors   ...
    manifest.json             key, shards (rows, bytes, sha256), per-layer shape; written last

An entry is built in a temporary folder and renamed into place, so a reader sees a whole entry or
none. A manifest that does not parse, a missing or truncated shard, a checksum or shape that does
not match: the entry is rebuilt, never trusted. Concurrent builders of one entry serialise on a file
lock beside it; the second waits, then reads what the first wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from encoder_fusion.benchmarks.features.fingerprint import FileIndex
from encoder_fusion.benchmarks.options import OptionError, is_int
from encoder_fusion.encoders import Encoder
from encoder_fusion.encoders.weights import tensors_sha256
from encoder_fusion.io import atomic_path, atomic_write, file_sha256

log = logging.getLogger(__name__)

CACHE_ENV = "FUSION_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/encoder-fusion/features"
MANIFEST = "manifest.json"
# content hashes of image files (encoder_fusion.benchmarks.features.fingerprint), beside the entries
FILE_INDEX = "file-index"
FORMAT_VERSION = 2  # 2: weights keyed by their parameters, images by their files' contents
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# a shard holds whole samples and stays near this size, so no single file gets huge
SHARD_BYTES = 256 * 2**20

ImageLoader = Callable[[Sequence[int]], torch.Tensor]


class CorruptEntry(Exception):
    """An entry on disk that cannot be trusted; the message says why."""


def resolve_cache_dir(configured: str | os.PathLike | None = None) -> Path:
    """The cache root: ``configured`` when given, else ``$FUSION_CACHE``, else
    ``~/.cache/encoder-fusion/features``."""
    chosen = configured or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


def parameter_digest(module: torch.nn.Module) -> str:
    """A sha256 over every parameter and buffer (names, shapes, dtypes and bytes) of ``module``."""
    return tensors_sha256(module.state_dict())


def encoder_key(encoder: Encoder) -> dict:
    """The fields of ``encoder`` that determine its grids, as a JSON-ready dict.

    The weights are keyed by a digest of the parameters as loaded, whatever they came from (random
    initialisation, a local file or folder, a hub cache), so new weights under an old name or path
    never meet old features; it costs one pass over the parameters (a few seconds for a ViT-L).
    """
    spec = encoder.spec
    return {
        "source": spec.source,
        "model": spec.model,
        "weights": spec.weights,
        "weights_loaded": encoder.weights_loaded,
        "parameters": parameter_digest(encoder.model),
        "model_kwargs": spec.model_kwargs,
        "image_size": list(encoder.image_size),
        "layers": list(encoder.layer_indices),
        "norm": spec.hooks.norm,
        "prefix": spec.hooks.prefix,
        "preprocessing": asdict(encoder.preprocessing),
    }


def indices_digest(indices: Sequence[int]) -> str:
    """A short sha256 of the sample indices, in order."""
    return hashlib.sha256(json.dumps([int(i) for i in indices]).encode()).hexdigest()[:16]


def key_digest(key: Mapping) -> str:
    """The sha256 of a key's canonical JSON form."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if needed) for the block's duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def distributed_shard() -> tuple[int, int] | None:
    """``(rank, world_size)`` when ``torch.distributed`` runs more than one process, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def extraction_device(device: str) -> str:
    """Under ``torchrun`` on GPUs, each process extracts on its own (``LOCAL_RANK``) device."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def all_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (a MIN all-reduce)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


class FeatureCache:
    """Hooked grids of frozen encoders on disk, one entry per key (see the module docstring).

    Args:
        root: the cache folder; None resolves ``$FUSION_CACHE``, then ``~/.cache/encoder-fusion/features``.
        dtype: storage dtype of the grids, ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``;
            grids are returned in float32 either way.
        content_key: how image files are known by their contents, ``"full"`` (every byte hashed on
            every run) or ``"quick"`` (see :mod:`encoder_fusion.benchmarks.features.fingerprint`).
        batch_size: images per encoder forward during extraction.
        device: where the encoder runs during extraction.
        progress: show a tqdm bar during extraction.

    Raises:
        ValueError: an unknown ``dtype`` or ``content_key``, or a ``batch_size`` below 1.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        dtype: str = "float32",
        content_key: str = "full",
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        if dtype not in STORAGE_DTYPES:
            raise OptionError(
                f"{{dtype}} is unknown; accepted: {', '.join(STORAGE_DTYPES)}", {"dtype": dtype}
            )
        if not is_int(batch_size) or batch_size < 1:
            raise OptionError("{batch_size} must be a positive int", {"batch_size": batch_size})
        self.root = resolve_cache_dir(root)
        self.files = FileIndex(self.root / FILE_INDEX, content_key)  # refuses an unknown content_key
        self.dtype = dtype
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress

    # -- keys -----------------------------------------------------------------------------------
    def key(self, encoder: Encoder, source: Mapping, indices: Sequence[int], pool: bool = False) -> dict:
        """The full key of the entry holding ``encoder``'s grids on ``indices`` of ``source``.

        Args:
            encoder: a built encoder.
            source: what identifies the images: dataset name, root, options and load size
                (JSON-serialisable values).
            indices: the sample indices, in the order their grids are returned.
            pool: the grids are stored mean-pooled to one cell.
        """
        key = {
            "format": FORMAT_VERSION,
            "encoder": encoder_key(encoder),
            "source": dict(source),
            "indices": indices_digest(indices),
            "count": len(indices),
            "dtype": self.dtype,
        }
        return {**key, "pooled": True} if pool else key

    def entry_dir(self, key: Mapping) -> Path:
        """The folder of the entry for ``key``."""
        model = "".join(c if c.isalnum() or c in "-_." else "_" for c in key["encoder"]["model"])[-60:]
        return self.root / f"{model}-{key_digest(key)[:20]}"

    # -- the one entry point ---------------------------------------------------------------------
    def grids(
        self,
        encoder: Encoder,
        source: Mapping,
        indices: Sequence[int],
        load_images: ImageLoader,
        *,
        pool: bool = False,
    ) -> list[torch.Tensor]:
        """``encoder``'s hooked grids for the samples ``indices``, from the cache or extracted now.

        Args:
            encoder: a built, frozen encoder.
            source: the identity of the images (see :meth:`key`).
            indices: sample indices; the returned tensors follow this order.
            load_images: returns the raw images ``(B, 3, H, W)`` (uint8 or float in [0, 1]) of a
                list of indices; called only when the entry must be built.
            pool: average every layer's tokens to one cell as each batch is extracted.

        Returns:
            One float32 tensor ``(len(indices), h, w, C)`` (``(len(indices), 1, 1, C)`` pooled) per
            hooked layer, in the order of ``encoder.spec.hooks.layers``.

        Under ``torch.distributed`` with several processes (``torchrun``), every process must call this
        with the same arguments: each extracts a contiguous slice of ``indices``, rank 0 assembles the
        entry from the slices, and every process returns the whole.

        Raises:
            ValueError: empty ``indices``, or images the encoder rejects.
            RuntimeError: (distributed) the extraction failed on some process.
        """
        if len(indices) == 0:
            raise ValueError("FeatureCache.grids: indices is empty; give at least one sample index")
        key = self.key(encoder, source, indices, pool)
        entry = self.entry_dir(key)
        shard = distributed_shard()
        if shard is not None:
            return self._grids_sharded(encoder, key, entry, indices, load_images, *shard)
        with contextlib.suppress(CorruptEntry):
            return self._read(entry, key)
        with file_lock(entry.with_name(entry.name + ".lock")):
            try:  # another writer may have finished while this one waited for the lock
                return self._read(entry, key)
            except CorruptEntry as why:
                if entry.exists():
                    log.warning("feature cache entry %s is not usable (%s); rebuilding it", entry, why)
            grids = self._extract(encoder, indices, load_images, pool=pool)
            self._write(entry, key, grids)
        return [g.float() for g in grids]

    def _grids_sharded(
        self,
        encoder: Encoder,
        key: Mapping,
        entry: Path,
        indices: Sequence[int],
        load_images: ImageLoader,
        rank: int,
        world: int,
    ) -> list[torch.Tensor]:
        try:
            cached = self._read(entry, key)
        except CorruptEntry:
            cached = None
        if all_ranks(cached is not None):  # decided together: no process may skip a barrier alone
            assert cached is not None  # this process's own answer is one of all
            return cached
        bounds = [len(indices) * r // world for r in range(world + 1)]
        staging = entry.with_name(f".{entry.name}.staging")
        part = staging / f"rank{rank:05d}.safetensors"
        failed = False
        if bounds[rank + 1] > bounds[rank]:
            try:
                chunk = indices[bounds[rank] : bounds[rank + 1]]
                grids = self._extract(encoder, chunk, load_images, rank, pool=bool(key.get("pooled")))
                with atomic_path(part) as temp:
                    save_file({f"layer{i}": g.contiguous() for i, g in enumerate(grids)}, temp)
            except Exception:  # every rank must reach the vote below, or the others wait forever
                log.exception("feature extraction of rank %d failed", rank)
                failed = True
        if not all_ranks(not failed):
            raise RuntimeError(
                f"feature extraction of {encoder.spec.name!r} failed on at least one of {world} processes; "
                "see each rank's log"
            )
        if rank == 0:
            with file_lock(entry.with_name(entry.name + ".lock")):
                try:
                    self._read(entry, key)  # another writer finished it meanwhile
                except CorruptEntry:
                    parts = [
                        load_file(staging / f"rank{r:05d}.safetensors")
                        for r in range(world)
                        if bounds[r + 1] > bounds[r]
                    ]
                    grids = [torch.cat([p[f"layer{i}"] for p in parts]) for i in range(len(parts[0]))]
                    self._write(entry, key, grids)
                shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()
        return self._read(entry, key)

    # -- internals ------------------------------------------------------------------------------
    def _extract(
        self,
        encoder: Encoder,
        indices: Sequence[int],
        load_images: ImageLoader,
        rank: int | None = None,
        *,
        pool: bool = False,
    ) -> list[torch.Tensor]:
        storage = STORAGE_DTYPES[self.dtype]
        outputs: list[torch.Tensor] = []
        encoder = encoder.to(self.device).eval()
        where = "" if rank is None else f" rank {rank}"
        bar = tqdm(
            total=len(indices),
            desc=f"features {encoder.spec.name} ({encoder.spec.model}){where}",
            unit="img",
            disable=not self.progress,
        )
        with bar, torch.inference_mode():
            for start in range(0, len(indices), self.batch_size):
                chunk = list(indices[start : start + self.batch_size])
                pixels = encoder.preprocess(load_images(chunk).to(self.device))
                layers = encoder.forward_grids(pixels)
                if pool:
                    layers = [grid.mean(dim=(1, 2), keepdim=True) for grid in layers]
                if not outputs:
                    outputs = [torch.empty((len(indices), *g.shape[1:]), dtype=storage) for g in layers]
                for out, grid in zip(outputs, layers):
                    out[start : start + len(chunk)] = grid.to("cpu", storage)
                bar.update(len(chunk))
        return outputs

    def _write(self, entry: Path, key: Mapping, grids: list[torch.Tensor]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # held under the entry's lock: temporaries of this entry are a killed writer's leftovers
        for stale in self.root.glob(f".{entry.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        temp = entry.with_name(f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        temp.mkdir()
        try:
            count = grids[0].shape[0]
            sample_bytes = sum(g[0].numel() * g.element_size() for g in grids)
            rows = max(1, SHARD_BYTES // max(1, sample_bytes))
            shards = []
            for number, start in enumerate(range(0, count, rows)):
                path = temp / f"shard-{number:05d}.safetensors"
                tensors = {f"layer{i}": g[start : start + rows].contiguous() for i, g in enumerate(grids)}
                save_file(tensors, path)
                shards.append(
                    {
                        "file": path.name,
                        "rows": min(rows, count - start),
                        "bytes": path.stat().st_size,
                        "sha256": file_sha256(path),
                    }
                )
            manifest = {
                "key": key,
                "shards": shards,
                "layers": [list(g.shape[1:]) for g in grids],
                "count": count,
            }
            atomic_write(temp / MANIFEST, json.dumps(manifest, indent=1, default=str))
            if entry.exists():  # a corrupt entry: move it aside first, the rename needs a free name
                trash = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}.trash")
                os.replace(entry, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(temp, entry)
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    def _read(self, entry: Path, key: Mapping) -> list[torch.Tensor]:
        manifest_path = entry / MANIFEST
        if not manifest_path.is_file():
            raise CorruptEntry("no manifest")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CorruptEntry(f"manifest does not parse: {error}") from error
        expected = json.loads(json.dumps(key, default=str))
        if not isinstance(manifest, dict) or manifest.get("key") != expected:
            raise CorruptEntry("manifest key differs from the requested key")
        try:
            shards, shapes, count = manifest["shards"], manifest["layers"], manifest["count"]
            parts: list[list[torch.Tensor]] = [[] for _ in shapes]
            for shard in shards:
                path = entry / shard["file"]
                if not path.is_file():
                    raise CorruptEntry(f"shard {shard['file']} is missing")
                if path.stat().st_size != shard["bytes"] or file_sha256(path) != shard["sha256"]:
                    raise CorruptEntry(f"shard {shard['file']} is truncated or altered")
                tensors = load_file(path)
                for i, shape in enumerate(shapes):
                    tensor = tensors.get(f"layer{i}")
                    if tensor is None or list(tensor.shape) != [shard["rows"], *shape]:
                        raise CorruptEntry(f"shard {shard['file']} layer{i}: shape differs from manifest")
                    parts[i].append(tensor)
        except (KeyError, TypeError, OSError, ValueError, SafetensorError) as error:
            raise CorruptEntry(f"unreadable entry: {error!r}") from error
        grids = [torch.cat(p).float() for p in parts]
        if not grids or any(g.shape[0] != count or count != key["count"] for g in grids):
            raise CorruptEntry("sample count differs from the manifest")
        return grids
