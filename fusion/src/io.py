"""Atomic file writes (a reader never sees half a file, and a failed write leaves no temporary behind),
file digests, and the check that a folder can be written before any work goes into it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (same suffix, so writers infer the format); when
    the block succeeds it is renamed onto ``path``, and it never outlives the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then rename.

    Returns:
        The path written.
    """
    try:
        with atomic_path(path) as temp, open(temp, "wb") as handle:
            handle.write(data if isinstance(data, bytes) else data.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:  # a full disk's write error names no file: say which one
        message = f"could not write {path}: {error.strerror or error}"
        raise (OSError(error.errno, message) if error.errno else OSError(message)) from error
    return Path(path)


def write_json(path: str | os.PathLike, data: object) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    return atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def nearest_existing(path: Path) -> Path:
    """``path`` itself when it exists, else its nearest existing parent."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(path: Path, what: str) -> None:
    """Refuse a folder that cannot be created or written: one that is a file, lies under a file, or
    whose nearest existing folder is not writable.

    Raises:
        ValueError: naming ``what`` (the setting), the path and the reason.
    """
    found = nearest_existing(path)
    if not found.is_dir():
        where = "is a file" if found == path.absolute() else f"lies under the file {found}"
        raise ValueError(f"{what}={path} {where}; accepted: a folder, or a path where one can be made")
    if not os.access(found, os.W_OK | os.X_OK):
        raise ValueError(
            f"{what}={path}: {found} is not writable (read-only, or another user's); accepted: a folder "
            "this user can write"
        )
