"""Feature cache: hits run no encoder, every key field makes its own entry, damage is rebuilt."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from encoder_fusion.benchmarks.features.cache import MANIFEST, FeatureCache, file_sha256, resolve_cache_dir
from encoder_fusion.encoders import build_encoder
from encoder_fusion.encoders.tiny import tiny_spec

SOURCE = {"name": "noise", "seed": 3, "load_size": 40}
INDICES = [4, 0, 9, 2, 7, 5, 1]  # unordered, not a multiple of the batch size


def images_of(indices) -> torch.Tensor:
    """Deterministic uint8 images, a pure function of each index (40 x 36: not square, not the
    encoder's input size, so preprocessing resizes)."""
    return torch.stack(
        [
            torch.randint(0, 256, (3, 40, 36), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
            for i in indices
        ]
    )


class Counted:
    """Wraps an encoder's forward_grids and counts the calls and images it sees."""

    def __init__(self, encoder) -> None:
        self.calls = 0
        self.images = 0
        original = encoder.forward_grids

        def counted(pixels):
            self.calls += 1
            self.images += pixels.shape[0]
            return original(pixels)

        encoder.forward_grids = counted


def tiny(kind="clip", seed=0, **fields):
    torch.manual_seed(seed)
    return build_encoder(tiny_spec(kind, **fields))


@pytest.fixture
def cache(tmp_path) -> FeatureCache:
    return FeatureCache(tmp_path / "cache", batch_size=3, progress=False)


def test_grids_match_the_encoder_and_a_second_strategy_runs_no_encoder(cache):
    encoder = tiny("dino_reg", layers=(1, -1, 0))
    with torch.inference_mode():
        expected = encoder.forward_grids(encoder.preprocess(images_of(INDICES)))
    counter = Counted(encoder)
    first = cache.grids(encoder, SOURCE, INDICES, images_of)
    assert counter.calls == 3 and counter.images == len(INDICES)  # batches of 3, 3, 1
    assert len(first) == 3
    for got, want in zip(first, expected):
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the next strategy of a sweep: a fresh cache object on the same root, the same data
    again = FeatureCache(cache.root, batch_size=5, progress=False).grids(
        encoder, SOURCE, INDICES, lambda idx: pytest.fail("a cache hit must not load images")
    )
    assert counter.calls == 3
    for got, want in zip(again, first):
        assert torch.equal(got, want)


def key_variants():
    """(label, encoder builder, source, indices, cache dtype) each differing from the base in one field."""
    base = ("base", lambda: tiny("clip"), SOURCE, INDICES, "float32")
    return [
        base,
        ("layers", lambda: tiny("clip", layers=(-2,)), SOURCE, INDICES, "float32"),
        ("norm", lambda: tiny("clip", norm="post"), SOURCE, INDICES, "float32"),
        ("prefix", lambda: tiny("clip", prefix="keep"), SOURCE, INDICES, "float32"),
        ("image_size", lambda: tiny("clip", image_size=48), SOURCE, INDICES, "float32"),
        ("weights", lambda: tiny("clip", seed=1), SOURCE, INDICES, "float32"),
        ("model", lambda: tiny("siglip"), SOURCE, INDICES, "float32"),
        ("dataset", lambda: tiny("clip"), {**SOURCE, "seed": 4}, INDICES, "float32"),
        ("load_size", lambda: tiny("clip"), {**SOURCE, "load_size": 32}, INDICES, "float32"),
        ("indices", lambda: tiny("clip"), SOURCE, INDICES[::-1], "float32"),
        ("dtype", lambda: tiny("clip"), SOURCE, INDICES, "float16"),
    ]


def test_every_key_field_makes_a_new_entry(tmp_path):
    seen = {}
    for label, make, source, indices, dtype in key_variants():
        cache = FeatureCache(tmp_path, dtype=dtype, batch_size=4, progress=False)
        encoder = make()
        counter = Counted(encoder)
        entry = cache.entry_dir(cache.key(encoder, source, indices))
        assert entry not in seen.values(), f"{label} shares an entry with {seen}"
        seen[label] = entry
        cache.grids(encoder, source, indices, images_of)
        assert counter.calls > 0, f"changing {label} must extract again"
        assert (entry / MANIFEST).is_file()
    # model_kwargs and a spec-level change the encoder reports differently
    encoder = tiny("clip")
    spec = replace(encoder.spec, model_kwargs={**encoder.spec.model_kwargs, "num_heads": 4})
    torch.manual_seed(0)
    other = build_encoder(spec)
    cache = FeatureCache(tmp_path, progress=False)
    assert cache.entry_dir(cache.key(other, SOURCE, INDICES)) != seen["base"]


def test_a_local_checkpoint_is_keyed_by_its_weights_not_its_name_or_mtime(tmp_path):
    path = tmp_path / "dino.safetensors"

    def write(seed: int) -> None:
        weights = tiny("dino", seed=seed).model.state_dict()
        save_file({k: v.contiguous() for k, v in weights.items()}, path)

    def entry():
        spec = replace(tiny("dino").spec, weights=str(path), on_missing="error")
        return cache.entry_dir(cache.key(build_encoder(spec), SOURCE, INDICES))

    cache = FeatureCache(tmp_path / "cache", progress=False)
    write(seed=0)
    stamp = path.stat().st_mtime_ns
    before = entry()
    later = stamp + 5_000_000_000
    os.utime(path, ns=(later, later))
    assert entry() == before  # touched, same weights: the same features
    write(seed=1)  # other weights under the same name, size and modification time
    os.utime(path, ns=(stamp, stamp))
    assert entry() != before


def damage_missing_manifest(entry: Path) -> None:
    (entry / MANIFEST).unlink()


def damage_garbled_manifest(entry: Path) -> None:
    (entry / MANIFEST).write_text('{"key": {"format": 1, "enc')


def damage_truncated_shard(entry: Path) -> None:
    shard = sorted(entry.glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-37])


def damage_missing_shard(entry: Path) -> None:
    sorted(entry.glob("shard-*.safetensors"))[-1].unlink()


def damage_flipped_byte(entry: Path) -> None:
    shard = sorted(entry.glob("shard-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-11] ^= 0x5A
    shard.write_bytes(bytes(data))


def damage_shape_mismatch(entry: Path) -> None:
    """A shard whose checksum is consistent with the manifest but whose tensor has the wrong shape."""
    manifest = json.loads((entry / MANIFEST).read_text())
    shard = manifest["shards"][0]
    rows = shard["rows"]
    h, w, c = manifest["layers"][0]
    save_file({"layer0": torch.randn(rows, h + 1, w, c)}, entry / shard["file"])
    shard["bytes"] = (entry / shard["file"]).stat().st_size
    shard["sha256"] = file_sha256(entry / shard["file"])
    (entry / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage",
    [
        damage_missing_manifest,
        damage_garbled_manifest,
        damage_truncated_shard,
        damage_missing_shard,
        damage_flipped_byte,
        damage_shape_mismatch,
    ],
)
def test_a_damaged_entry_is_rebuilt_not_trusted(tmp_path, damage, monkeypatch):
    import encoder_fusion.benchmarks.features.cache as features

    monkeypatch.setattr(features, "SHARD_BYTES", 1)  # one sample per shard: several shards
    cache = FeatureCache(tmp_path, batch_size=4, progress=False)
    encoder = tiny("clip", layers=(0, -1))
    counter = Counted(encoder)
    first = cache.grids(encoder, SOURCE, INDICES, images_of)
    entry = cache.entry_dir(cache.key(encoder, SOURCE, INDICES))
    assert len(list(entry.glob("shard-*.safetensors"))) == len(INDICES)
    damage(entry)
    calls = counter.calls
    rebuilt = cache.grids(encoder, SOURCE, INDICES, images_of)
    assert counter.calls > calls, "a damaged entry must be extracted again"
    for got, want in zip(rebuilt, first):
        torch.testing.assert_close(got, want)
    # and the rebuilt entry is whole again: the next read runs no encoder
    calls = counter.calls
    cache.grids(encoder, SOURCE, INDICES, images_of)
    assert counter.calls == calls
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".trash"))]


def test_concurrent_writers_extract_once(tmp_path):
    encoder = tiny("dino")
    counter = Counted(encoder)
    results, errors = {}, []

    def slow_images(indices):
        time.sleep(0.2)  # keeps the first writer inside its lock while the second arrives
        return images_of(indices)

    def worker(name):
        try:
            cache = FeatureCache(tmp_path, batch_size=len(INDICES), progress=False)
            results[name] = cache.grids(encoder, SOURCE, INDICES, slow_images)
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert counter.calls == 1
    for got, want in zip(results["a"], results["b"]):
        assert torch.equal(got, want)


def test_cache_root_and_bad_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "cfg") == tmp_path / "cfg"
    monkeypatch.delenv("FUSION_CACHE")
    assert resolve_cache_dir(None) == Path("~/.cache/encoder-fusion/features").expanduser()
    with pytest.raises(ValueError, match=r"dtype='int8'.*float32"):
        FeatureCache(tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="batch_size=0"):
        FeatureCache(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="indices is empty"):
        FeatureCache(tmp_path, progress=False).grids(tiny("clip"), SOURCE, [], images_of)
