"""Content keys of image files: what the feature cache knows a file by.

A feature cache entry is keyed by what its pixels depend on, so the image files' contents, not their
names, are part of the key. Two ways to know a file's contents (``bench.content_key``):

* ``full`` (the default): the sha256 of every byte of every file, on every run. Any edit anywhere in
  a file changes its key. Its cost is small beside decoding the same images, which every run does
  anyway (measured: ``python -m encoder_fusion.benchmarks.features.content_key_cost``, README
  "Reliability").
* ``quick``, for datasets too big to read twice: :class:`FileIndex` records per file a cheap key
  (size, modification time in ns, and a sha256 of its first and last 64 KiB) beside the sha256 of
  the whole file, and trusts the recorded hash while the cheap key is unchanged; any change to it
  hashes the whole file again. Unseen: an edit inside the file that keeps its size, its mtime and
  both end blocks.

Either way a file copied elsewhere with the same bytes keeps its key. The index is one JSON file per
folder of images, under the cache root; it is rewritten atomically, so a reader never sees half of
it, and an index lost or damaged only costs one full hashing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from encoder_fusion.benchmarks.options import OptionError
from encoder_fusion.io import atomic_write, file_sha256

BLOCK = 64 * 2**10
INDEX_VERSION = 1
# bench.content_key: hash every byte on every run, or trust a recorded hash while the cheap key holds
CONTENT_KEYS = ("full", "quick")


def resolved(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Every path made absolute with its folder's symlinks resolved, each folder resolved once (a
    resolve per file was most of the key's cost on a folder of small images)."""
    folders: dict[str, str] = {}
    out = []
    for item in paths:
        folder, name = os.path.split(os.fspath(item))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder or ".")
        out.append(os.path.join(folders[folder], name))
    return out


def ends_sha256(path: str | os.PathLike, size: int) -> str:
    """The sha256 of the first and last :data:`BLOCK` bytes: of the whole file up to two blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(BLOCK))
        if size > BLOCK:
            handle.seek(max(BLOCK, size - BLOCK))
            digest.update(handle.read())
    return digest.hexdigest()


class FileIndex:
    """Content hashes of files, kept under ``folder``; ``content_key`` one of :data:`CONTENT_KEYS`
    (see the module docstring).

    Raises:
        ValueError: an unknown ``content_key``.
    """

    def __init__(self, folder: str | os.PathLike, content_key: str = "full") -> None:
        if content_key not in CONTENT_KEYS:
            raise OptionError(
                f"{{content_key}} is unknown; accepted: {', '.join(CONTENT_KEYS)}",
                {"content_key": content_key},
            )
        self.folder = Path(folder)
        self.content_key = content_key

    def index_path(self, paths: Sequence[str | os.PathLike]) -> Path:
        """The index file of the folder holding ``paths``."""
        return self._index_of(resolved(paths))

    def _index_of(self, paths: Sequence[str]) -> Path:
        common = os.path.commonpath(list({os.path.dirname(p) for p in paths}))
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
        """The sha256 of every file's contents, in order: every file hashed whole (``full``), or only
        those whose cheap key changed (``quick``).

        Raises:
            FileNotFoundError: a file that does not exist (named).
        """
        paths = resolved(paths)
        if not paths:
            return []
        where = self._index_of(paths)
        files, changed, hashes = self._load(where), False, []
        for path in paths:
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"image file {path} does not exist") from None
            cheap = [stat.st_size, stat.st_mtime_ns, ends_sha256(path, stat.st_size)]
            entry = files.get(path)
            trusted = (
                self.content_key == "quick"
                and isinstance(entry, list)
                and len(entry) == 4
                and entry[:3] == cheap
                and isinstance(entry[3], str)
            )
            if not trusted:
                # a file of up to two blocks was read whole by its cheap key
                whole = cheap[2] if stat.st_size <= 2 * BLOCK else file_sha256(path)
                if entry != [*cheap, whole]:  # recorded, so that a later quick run starts warm
                    entry = files[path] = [*cheap, whole]
                    changed = True
            hashes.append(files[path][3])
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
