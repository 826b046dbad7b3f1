"""Finding and reading checkpoints, offline first.

Weights resolve in one order for every source library: an explicit local file or folder, then the
local caches (Hugging Face hub cache, torch hub cache, open_clip cache), then the hub when it is
online. Whatever is found is read into a plain state dict here and loaded with :func:`load_checked`,
so a checkpoint that does not fit names its offending keys instead of failing deep inside torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

# ``EncoderSpec.weights`` value asking for the random initialisation on purpose: no lookup, no warning
RANDOM_WEIGHTS = "random"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# files a model folder or hub repo may hold, best first
FOLDER_CHECKPOINTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# wrappers training scripts put around a state dict
WRAPPER_KEYS = ("state_dict", "model", "module")
# prefixes that DataParallel / DDP and full-model checkpoints put before the parameter names
DATA_PARALLEL_PREFIX = "module."
SHOWN_KEYS = 5


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def looks_like_path(value: str | os.PathLike) -> bool:
    """Whether ``value`` is written as a local path (``/``, ``./``, ``../``, ``~``), not a name."""
    return isinstance(value, os.PathLike) or os.fspath(value).startswith(("/", "./", "../", "~", "\\"))


def local_weights_path(weights: str | os.PathLike | None) -> Path | None:
    """The local path that ``weights`` names, or None when it is a tag or repo id (or None).

    A value is a path when it exists, is written as one (:func:`looks_like_path`) or ends with a
    checkpoint suffix (``.safetensors``, ``.pt``, ``.pth``, ``.bin``, ``.ckpt``).

    Raises:
        FileNotFoundError: ``weights`` looks like a path but nothing is there.
    """
    if weights is None:
        return None
    text = os.fspath(weights)
    if not text.strip():
        raise ValueError(
            "weights='' names no file or folder; accepted: a checkpoint path, a tag or a repo id"
        )
    path = Path(text).expanduser()
    if path.exists():
        return path
    if looks_like_path(weights) or text.lower().endswith(CHECKPOINT_SUFFIXES):
        raise FileNotFoundError(f"weights file or folder not found: {path}")
    return None


def find_checkpoint_in_folder(folder: Path) -> Path:
    """The checkpoint inside a model folder (``model.safetensors``, ``pytorch_model.bin``, ...).

    Raises:
        FileNotFoundError: none of the known checkpoint names, and not exactly one checkpoint file.
    """
    for name in FOLDER_CHECKPOINTS:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
    if len(candidates) == 1:
        return candidates[0]
    raise FileNotFoundError(
        f"no checkpoint found in folder {folder}: looked for {', '.join(FOLDER_CHECKPOINTS)}"
        + (f"; several candidates {[p.name for p in candidates]}, name one" if candidates else "")
    )


def sharded_checkpoint(folder: Path) -> list[Path]:
    """The shard files a ``*.index.json`` in ``folder`` names (large Hugging Face checkpoints), or [].

    Raises:
        FileNotFoundError: a shard the index names is absent.
        ValueError: an index that is not JSON with a ``weight_map``.
    """
    for index_name in SHARD_INDEXES:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"checkpoint index {index} is not JSON with a weight_map") from error
            shards = [folder / name for name in sorted(set(weight_map.values()))]
            absent = [str(p) for p in shards if not p.is_file()]
            if absent:
                raise FileNotFoundError(f"checkpoint index {index} names absent shard(s): {absent[:3]}")
            return shards
    return []


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _read_raw(path: Path) -> object:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if _is_torchscript_archive(path):
        # OpenAI's released CLIP checkpoints are TorchScript archives of the whole model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, its archives are not
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    return torch.load(str(path), map_location="cpu", weights_only=True)


def unwrap_state_dict(raw: object, source: str) -> dict[str, torch.Tensor]:
    """Peel ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and the ``module.`` prefix.

    Raises:
        ValueError: no mapping of tensors inside.
    """
    while isinstance(raw, Mapping):
        inner = next((raw[k] for k in WRAPPER_KEYS if isinstance(raw.get(k), Mapping)), None)
        if inner is None:
            break
        raw = inner
    if not isinstance(raw, Mapping):
        raise ValueError(f"checkpoint {source} holds a {type(raw).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"checkpoint {source} holds no tensors (keys: {list(raw)[:SHOWN_KEYS]})")
    if all(k.startswith(DATA_PARALLEL_PREFIX) for k in tensors):
        tensors = {k[len(DATA_PARALLEL_PREFIX) :]: v for k, v in tensors.items()}
    return tensors


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (or a model folder) into a flat ``{name: tensor}`` state dict.

    Accepts ``.safetensors``; torch pickles (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), also wrapped in
    ``{"state_dict": ...}`` / ``{"model": ...}`` and with a ``module.`` prefix; TorchScript archives
    (OpenAI CLIP releases); a folder holding one of :data:`FOLDER_CHECKPOINTS` or a sharded
    checkpoint with its ``*.index.json``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: the file is corrupt, truncated or holds no state dict.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"weights file or folder not found: {path}")
    if path.is_dir():
        shards = sharded_checkpoint(path)
        if shards:
            merged: dict[str, torch.Tensor] = {}
            for shard in shards:
                merged.update(read_state_dict(shard))
            return merged
        path = find_checkpoint_in_folder(path)
    try:
        raw = _read_raw(path)
    except Exception as error:  # torch and safetensors raise a zoo of types for a damaged file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"checkpoint {path} could not be read: it is corrupt, truncated or not a checkpoint "
            f"({type(error).__name__}: {reason[:200]})"
        ) from error
    return unwrap_state_dict(raw, str(path))


def take_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` with it removed; the whole dict when no key has the prefix."""
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict)
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _shown(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def fit_problems(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """How ``state_dict`` fails to fit a model whose state dict is ``expected``: missing keys,
    unexpected keys and wrong shapes, a few of each named; empty when it fits."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_shown(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_shown(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {_shown(wrong_shape)}")
    return problems


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf: loaded, they turn every output into NaN without an error.

    Raises:
        ValueError: naming ``source`` and a few of the tensors.
    """
    bad = [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise ValueError(
            f"{source} holds NaN or Inf in {len(bad)} tensor(s): {_shown(bad)}; accepted: finite weights "
            "(a diverged training run or a damaged file writes such values)"
        )


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """A sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def load_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, what: str) -> None:
    """Load ``state_dict`` into ``module`` strictly, after checking every key and shape and that every
    weight is finite.

    Raises:
        ValueError: missing keys, unexpected keys or wrong shapes, a few of each named; NaN or Inf in
            some tensors, a few named.
    """
    problems = fit_problems(module.state_dict(), state_dict)
    if problems:
        raise ValueError(
            f"checkpoint {source} does not fit {what} (is it another architecture or size?); "
            + "; ".join(problems)
        )
    check_finite(state_dict, f"checkpoint {source}")
    module.load_state_dict(dict(state_dict), strict=True)


def cached_hub_file(repo_id: str, filenames: Iterable[str]) -> Path | None:
    """The first of ``filenames`` of hub repo ``repo_id`` already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo_id, filename)
        except ValueError:  # not a valid repo id
            return None
        if isinstance(found, str):
            return Path(found)
    return None


def download_hub_file(repo_id: str, filenames: Iterable[str]) -> Path | None:
    """Download the first of ``filenames`` that hub repo ``repo_id`` has; None when offline or absent."""
    if hub_offline():
        return None
    from huggingface_hub import hf_hub_download

    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename))
        except Exception:  # absent file, unknown repo, no network: try the next, then give up
            continue
    return None


def hub_checkpoint(repo_id: str, filenames: Iterable[str] = FOLDER_CHECKPOINTS) -> Path | None:
    """A checkpoint of hub repo ``repo_id``: from the local cache, else downloaded when online."""
    filenames = list(filenames)
    return cached_hub_file(repo_id, filenames) or download_hub_file(repo_id, filenames)


def url_checkpoint(url: str, cache_dirs: Iterable[str | os.PathLike] = ()) -> Path | None:
    """A checkpoint published at ``url``: from ``cache_dirs`` or the torch hub cache, else downloaded
    into the torch hub cache when online; None when it cannot be had."""
    if not url:
        return None
    filename = os.path.basename(url.split("?")[0])
    torch_cache = Path(torch.hub.get_dir()) / "checkpoints"
    for folder in (*cache_dirs, torch_cache):
        cached = Path(folder).expanduser() / filename
        if cached.is_file():
            return cached
    if hub_offline():
        return None
    target = torch_cache / filename
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception:  # no network or a dead link: the caller decides what a miss means
        return None
    return target


def weights_missing(spec, looked_for: str, supply: str) -> str:
    """Handle an encoder whose weights cannot be had: warn and return ``"random"``, or raise.

    Args:
        spec: the :class:`~encoder_fusion.encoders.base.EncoderSpec`; its ``on_missing`` decides.
        looked_for: what was searched (tag, repo id, cache paths).
        supply: how a user can supply the weights.

    Raises:
        FileNotFoundError: ``spec.on_missing == "error"``.
    """
    where = "offline" if hub_offline() else "locally or on the hub"
    message = (
        f"no weights for encoder {spec.name!r} ({spec.source} {spec.model}) could be found {where}: "
        f"looked for {looked_for}. {supply}"
    )
    if spec.on_missing == "random":
        warnings.warn(
            f"{message} RANDOM WEIGHTS: encoder {spec.name!r} keeps its random initialisation "
            "(on_missing='random'); every result it gives is stamped weights='random'.",
            UserWarning,
            stacklevel=3,
        )
        return "random"
    raise FileNotFoundError(f"{message} Or set on_missing='random' to run on random weights.")
