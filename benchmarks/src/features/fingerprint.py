"""Content keys of image files, cheap enough to take on every run.

A feature cache entry is keyed by what its pixels depend on, so the image files' contents, not their
names, are part of the key. Hashing every byte on every run would read as much as extracting does,
so :class:`FileIndex` records per file a cheap key (size, modification time in ns, and a sha256 of
its first and last 64 KiB) beside the sha256 of the whole file. While a file's cheap key is
unchanged its recorded hash is used; any change to it (size, mtime, first or last bytes) hashes the
whole file again, so a file rewritten or touched is re-read once, and a file copied elsewhere with
the same bytes keeps its key. Unseen: an edit inside the file that keeps its size, its mtime and
both end blocks.

The index is one JSON file per folder of images, under the cache root; it is rewritten atomically,
so a reader never sees half of it, and an index lost or damaged only costs one full hashing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from encoder_fusion.io import atomic_write, file_sha256

BLOCK = 64 * 2**10
INDEX_VERSION = 1


def ends_sha256(path: Path, size: int) -> str:
    """The sha256 of the first and last :data:`BLOCK` bytes: of the whole file up to two blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(BLOCK))
        if size > BLOCK:
            handle.seek(max(BLOCK, size - BLOCK))
            digest.update(handle.read())
    return digest.hexdigest()


class FileIndex:
    """Content hashes of files, kept under ``folder`` (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def index_path(self, paths: Sequence[Path]) -> Path:
        """The index file of the folder holding ``paths``."""
        common = os.path.commonpath([str(Path(p).resolve().parent) for p in paths])
        return self.folder / f"{hashlib.sha256(common.encode()).hexdigest()[:16]}.json"

    def _load(self, path: Path) -> dict[str, list]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or damaged: every file is hashed again
            return {}
        if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
            return {}
        files = data.get("files")
        return files if isinstance(files, dict) else {}

    def content_hashes(self, paths: Sequence[str | os.PathLike]) -> list[str]:
        """The sha256 of every file's contents, in order, hashing only files whose cheap key changed.

        Raises:
            FileNotFoundError: a file that does not exist (named).
        """
        paths = [Path(p).resolve() for p in paths]
        if not paths:
            return []
        where = self.index_path(paths)
        files, changed, hashes = self._load(where), False, []
        for path in paths:
            try:
                stat = path.stat()
            except FileNotFoundError:
                raise FileNotFoundError(f"image file {path} does not exist") from None
            cheap = [stat.st_size, stat.st_mtime_ns, ends_sha256(path, stat.st_size)]
            entry = files.get(str(path))
            if not isinstance(entry, list) or entry[:3] != cheap:
                full = cheap[2] if stat.st_size <= 2 * BLOCK else file_sha256(path)
                entry = files[str(path)] = [*cheap, full]
                changed = True
            hashes.append(entry[3])
        if changed:
            atomic_write(where, json.dumps({"version": INDEX_VERSION, "files": files}))
        return hashes

    def digest(self, paths: Sequence[str | os.PathLike]) -> str | None:
        """One sha256 over the contents of ``paths``, in order; None for no files (generated data).

        Raises:
            FileNotFoundError: a file that does not exist (named).
        """
        if not paths:
            return None
        return hashlib.sha256("\n".join(self.content_hashes(paths)).encode()).hexdigest()
