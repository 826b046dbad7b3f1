"""The feature cache never serves stale features: image files are keyed by their contents (every byte
hashed on every run by default; with ``quick``, a cheap key per file and the whole file hashed again
when it changes), the synthetic set by its generator's version and parameters."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import encoder_fusion.benchmarks.features.fingerprint as fingerprint
from encoder_fusion.benchmarks.datasets import SyntheticShapesDataset, build_dataset
from encoder_fusion.benchmarks.features.cache import FILE_INDEX
from encoder_fusion.benchmarks.features.fingerprint import BLOCK, FileIndex
from encoder_fusion.benchmarks.run import run_benchmark

REPO = Path(__file__).resolve().parents[2]


def write_bytes(path: Path, data: bytes, mtime_ns: int | None = None) -> None:
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture
def full_hashes(monkeypatch) -> list[Path]:
    """The files hashed whole, in order."""
    seen = []
    original = fingerprint.file_sha256

    def counted(path):
        seen.append(Path(path))
        return original(path)

    monkeypatch.setattr(fingerprint, "file_sha256", counted)
    return seen


def test_a_file_rewritten_in_place_gets_a_new_key(tmp_path):
    index, path = FileIndex(tmp_path / "index"), tmp_path / "a.png"
    write_bytes(path, b"x" * 500)
    stamp = path.stat().st_mtime_ns
    before = index.digest([path])
    write_bytes(path, b"y" * 500, mtime_ns=stamp)  # same name, size and modification time
    assert index.digest([path]) != before


def middle_edited(path: Path) -> None:
    """One byte flipped in the middle of ``path``, its size, mtime and end blocks kept."""
    stamp, data = path.stat().st_mtime_ns, bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    write_bytes(path, bytes(data), mtime_ns=stamp)


def test_the_full_key_sees_an_edit_that_keeps_size_mtime_and_end_blocks(tmp_path, full_hashes):
    """The issue's case: an image edited in its middle, size and mtime kept. The default key hashes
    every byte on every run, so it changes; the quick key (opt-in) is documented to miss it."""
    path = tmp_path / "a.bin"
    write_bytes(path, os.urandom(5 * BLOCK))
    full, quick = FileIndex(tmp_path / "full"), FileIndex(tmp_path / "quick", "quick")
    want_before = hashlib.sha256(path.read_bytes()).hexdigest()
    assert full.content_hashes([path]) == quick.content_hashes([path]) == [want_before]
    middle_edited(path)
    want_after = hashlib.sha256(path.read_bytes()).hexdigest()
    assert want_after != want_before
    assert full.content_hashes([path]) == [want_after]
    assert quick.content_hashes([path]) == [want_before]  # the opt-in's known blind spot


def test_the_full_key_reads_every_file_on_every_run(tmp_path, full_hashes):
    index = FileIndex(tmp_path / "index")
    paths = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, path in enumerate(paths):
        write_bytes(path, bytes([i]) * (3 * BLOCK))
    first = index.digest(paths)
    assert index.digest(paths) == first
    assert full_hashes == [p.resolve() for p in paths] * 2
    # a quick index over the same folder starts warm: the full runs recorded what it trusts
    full_hashes.clear()
    assert FileIndex(tmp_path / "index", "quick").digest(paths) == first and full_hashes == []


def test_an_unknown_content_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"content_key='sha1' is unknown; accepted: full, quick"):
        FileIndex(tmp_path, "sha1")


def test_unchanged_files_are_not_read_whole_again(tmp_path, full_hashes):
    index = FileIndex(tmp_path / "index", "quick")
    big = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, path in enumerate(big):
        write_bytes(path, bytes([i]) * (3 * BLOCK))
    first = index.digest(big)
    assert full_hashes == [p.resolve() for p in big]
    full_hashes.clear()
    assert index.digest(big) == first and full_hashes == []  # the cheap key matched
    # a change in the middle with a new mtime: the cheap key changed, so the whole file is hashed
    data = bytearray(big[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    write_bytes(big[1], bytes(data), mtime_ns=big[1].stat().st_mtime_ns + 1_000_000_000)
    changed = index.digest(big)
    assert changed != first and full_hashes == [big[1].resolve()]


@pytest.mark.parametrize("content_key", ["full", "quick"])
def test_a_touched_or_copied_file_keeps_its_key(tmp_path, content_key):
    index = FileIndex(tmp_path / "index", content_key)
    path = tmp_path / "one" / "a.bin"
    path.parent.mkdir()
    write_bytes(path, os.urandom(3 * BLOCK))
    before = index.content_hashes([path])
    write_bytes(path, path.read_bytes(), mtime_ns=path.stat().st_mtime_ns + 5_000_000_000)
    assert index.content_hashes([path]) == before
    copy = tmp_path / "two" / "a.bin"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert index.content_hashes([copy]) == before


def test_a_damaged_index_costs_one_hashing_not_a_wrong_key(tmp_path, full_hashes):
    index, path = FileIndex(tmp_path / "index", "quick"), tmp_path / "a.bin"
    write_bytes(path, os.urandom(3 * BLOCK))
    before = index.digest([path])
    index.index_path([path]).write_text('{"version": 1, "files": {"')
    assert index.digest([path]) == before and len(full_hashes) == 2


def test_a_damaged_entry_is_hashed_again_not_trusted(tmp_path):
    index, path = FileIndex(tmp_path / "index", "quick"), tmp_path / "a.bin"
    write_bytes(path, os.urandom(3 * BLOCK))
    want = index.content_hashes([path])
    where = index.index_path([path])
    data = json.loads(where.read_text())
    for damaged in (data["files"][str(path.resolve())][:3], [*data["files"][str(path.resolve())][:3], 7]):
        data["files"][str(path.resolve())] = damaged  # the cheap key intact, the hash lost or not a hash
        where.write_text(json.dumps(data))
        assert index.content_hashes([path]) == want


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image file .*gone\.png does not exist"):
        FileIndex(tmp_path).digest([tmp_path / "gone.png"])
    assert FileIndex(tmp_path).digest([]) is None


def test_the_synthetic_key_covers_its_generator_and_parameters(monkeypatch):
    base = build_dataset("synthetic", num_images=12).identity()
    assert build_dataset("synthetic", num_images=12).identity() == base
    for options in ({"num_images": 13}, {"image_size": 32}, {"shapes": ["circle", "ring"]}, {"words": False}):
        assert build_dataset("synthetic", **{"num_images": 12, **options}).identity() != base, options
    assert build_dataset("synthetic", num_images=12, seed=1).identity() != base
    monkeypatch.setattr(
        SyntheticShapesDataset, "GENERATOR_VERSION", SyntheticShapesDataset.GENERATOR_VERSION + 1
    )
    assert build_dataset("synthetic", num_images=12).identity() != base


def write_pictures(root: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def entries(cache_dir: Path) -> dict[str, list[torch.Tensor]]:
    """Every whole entry of a feature cache: its tensors, by entry name."""
    from safetensors.torch import load_file

    return {
        entry.name: [t for shard in sorted(entry.glob("shard-*")) for t in load_file(shard).values()]
        for entry in cache_dir.iterdir()
        if (entry / "manifest.json").is_file()
    }


def extract(root: Path, cache_dir: Path, out: Path) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=smoke",
                "data=imagefolder",
                f"data.root={root}",
                "data.limit=null",
                "bench.extract_only=true",
                f"bench.cache_dir={cache_dir}",
            ],
        )
    run_benchmark(cfg, out)


def test_other_pictures_under_the_same_names_are_extracted_again(tmp_path):
    """The issue's case: an ImageFolder overwritten with other pictures under the same names; the
    features served afterwards are those a fresh cache computes."""
    root, cache = tmp_path / "folder", tmp_path / "cache"
    write_pictures(root, seed=0)
    extract(root, cache, tmp_path / "run")
    before = entries(cache)
    assert len(before) == 4  # two encoders, train and test
    extract(root, cache, tmp_path / "run")
    assert entries(cache).keys() == before.keys()  # unchanged files: a cache hit
    write_pictures(root, seed=1)  # same names, same sizes
    extract(root, cache, tmp_path / "run")
    extract(root, tmp_path / "fresh", tmp_path / "run")
    fresh, now = entries(tmp_path / "fresh"), entries(cache)
    assert fresh.keys() == now.keys() - before.keys() and len(fresh) == 4
    for name, tensors in fresh.items():
        for got, want in zip(now[name], tensors, strict=True):
            assert torch.equal(got, want)
    assert [p.parent.name for p in (cache / FILE_INDEX).iterdir()] == [FILE_INDEX]  # one index: one folder
