"""Sizes the machine cannot hold are refused at construction with the estimate in GB, and a feature
holding NaN or Inf is named by its encoder and hooked layer before it reaches the connector."""

from __future__ import annotations

import pytest
import torch

import encoder_fusion.memory
import encoder_fusion.model
from encoder_fusion import EncoderGeometry, FusionHead
from encoder_fusion.align import build_aligner
from encoder_fusion.connector import build_connector
from encoder_fusion.kernels import NonFiniteError, finite_checks

GEOMETRIES = [
    EncoderGeometry("clip", 12, (5, 5), 2, (1, 3)),
    EncoderGeometry("dino", 20, (7, 7), 3, (2, 4, -1)),
]


def grids_of(geometries, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(3, *g.grid, g.width, generator=generator) for _ in range(g.num_layers)]
        for g in geometries
    ]


# -- memory --------------------------------------------------------------------------------------
def meminfo_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        line = next(line for line in meminfo if line.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


def test_available_bytes_is_the_hosts_free_memory():
    measured = encoder_fusion.memory.available_bytes("cpu")
    # read twice, around other processes' allocations: within 10 % of each other
    assert measured == pytest.approx(meminfo_available(), rel=0.1)


@pytest.fixture
def one_gb_free(monkeypatch):
    monkeypatch.setattr(encoder_fusion.memory, "available_bytes", lambda device="cpu": 10**9)


def test_a_connector_wider_than_memory_is_refused_with_its_estimate(one_gb_free):
    # 1000 x 500,000 float32 weights: 2.0 GB against 1.0 GB free
    with pytest.raises(
        ValueError, match=r"connector 1000 -> 500000 needs about 2\.0 GB, more than the 1\.0 GB free on cpu"
    ):
        build_connector({"kind": "mlp", "out_dim": 500_000}, 1000)
    assert build_connector({"kind": "mlp", "out_dim": 2000}, 1000).out_dim == 2000  # 8 MB fits


def test_a_million_wide_connector_is_refused_on_this_machine():
    # 16,384 x 1,000,000 float32 weights: 65.5 GB, more than this 24 GB machine has
    with pytest.raises(ValueError, match=r"connector 16384 -> 1000000 needs about 65\.5 GB, more than the"):
        build_connector({"kind": "mlp", "out_dim": 10**6}, 16384)


def test_a_huge_head_grid_is_refused_before_allocation(one_gb_free):
    # 100,000 x 100,000 cells x (12 x 2 + 20 x 3) channels x 4 bytes
    expected = 4 * 10**10 * (12 * 2 + 20 * 3) / 1e9
    with pytest.raises(
        ValueError, match=rf"grid 100000x100000 \(one image's aligned layers\) needs about {expected:,.1f} GB"
    ):
        FusionHead(GEOMETRIES, grid=[100_000, 100_000])
    FusionHead(GEOMETRIES, grid=[9, 11])  # an ordinary grid passes


def test_learned_queries_onto_a_huge_grid_are_refused(one_gb_free):
    # 4,000 x 4,000 queries x (64 channels + 8 heads x 49 keys) x 4 bytes = 29.2 GB
    with pytest.raises(ValueError, match=r"align 'learned' onto 4000x4000 .* needs about 29\.2 GB"):
        build_aligner("learned", 64, (7, 7), (4000, 4000))
    assert build_aligner("learned", 64, (7, 7), (6, 5)).out_grid == (6, 5)


# -- poisoned features ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("head", "fused_route"),
    [({}, True), ({"align": "learned"}, False), ({"merge_dim": 16}, False)],
    ids=["one grid_fuse call", "learned align", "merge_dim"],
)
@pytest.mark.parametrize(
    ("encoder", "index", "layer"), [(0, 1, 3), (1, 0, 2), (1, 2, -1)], ids=["clip 3", "dino 2", "dino -1"]
)
def test_a_non_finite_feature_is_named_by_encoder_and_layer(head, fused_route, encoder, index, layer):
    model = FusionHead(GEOMETRIES, grid=(6, 6), **head)
    assert model.fused_route is fused_route
    grids = grids_of(GEOMETRIES)
    grids[encoder][index][1, 2, 3, 4] = float("nan")
    name = GEOMETRIES[encoder].name
    with finite_checks(), pytest.raises(NonFiniteError) as caught:
        model(grids)
    assert str(caught.value).startswith(
        f"encoder {name!r}, hooked layer {layer} (HookSpec.layers[{index}]), holds NaN or Inf"
    )
    # the switch off (the library's default), the NaN is not looked for and reaches the tokens
    with finite_checks(False):
        assert not model(grids).isfinite().all()


def test_finite_features_pass_the_check_unchanged():
    model = FusionHead(GEOMETRIES, grid=(6, 6))
    grids = grids_of(GEOMETRIES, seed=3)
    with finite_checks():
        checked = model(grids)
    torch.testing.assert_close(checked, model(grids), rtol=0, atol=0)


# -- where files come from and go to -------------------------------------------------------------
@pytest.mark.parametrize("weights", ["", "   "])
def test_blank_weights_are_refused_naming_the_field(weights, tmp_path, monkeypatch):
    import dataclasses

    from encoder_fusion.encoders.tiny import tiny_spec

    # a checkpoint in the working directory must never be picked up by accident
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"EncoderSpec\.weights='\s*' for encoder 'clip' names nothing"):
        dataclasses.replace(tiny_spec("clip"), weights=weights)


@pytest.fixture(scope="module")
def fused():
    from encoder_fusion import FusedEncoder
    from encoder_fusion.encoders import build_encoder
    from encoder_fusion.encoders.tiny import tiny_spec

    torch.manual_seed(0)
    return FusedEncoder([build_encoder(tiny_spec("clip"))], connector={"kind": "linear", "out_dim": 4})


def test_save_trained_names_an_empty_or_folder_path(fused, tmp_path):
    for path in ("", " "):
        with pytest.raises(ValueError, match=r"save_trained path='\s*' names no file"):
            fused.save_trained(path)
    with pytest.raises(ValueError, match=r"save_trained path .* is a folder; accepted: a file path"):
        fused.save_trained(tmp_path)


def test_a_full_disk_under_save_trained_is_an_os_error_naming_the_path(fused, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:  # half a file, then the disk is full
            handle.write(b"\0" * 10)
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(encoder_fusion.model, "save_file", full_disk)
    target = tmp_path / "fusion.safetensors"
    with pytest.raises(OSError, match=rf"save_trained could not write {target}: .*No space left on device"):
        fused.save_trained(target)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind


def test_a_full_disk_under_a_report_write_names_the_file(tmp_path, monkeypatch):
    import errno
    import os

    from encoder_fusion.io import write_json

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    target = tmp_path / "report.json"
    with pytest.raises(OSError, match=rf"could not write {target}: No space left on device") as caught:
        write_json(target, {"done": True})
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


# -- precision, device and layout ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_runs_on_float_images_and_agrees_with_float32(dtype):
    import copy

    from encoder_fusion import FusedEncoder
    from encoder_fusion.encoders import build_encoder
    from encoder_fusion.encoders.tiny import tiny_spec

    torch.manual_seed(1)
    model = FusedEncoder(
        [build_encoder(tiny_spec("clip"))], connector={"kind": "linear", "out_dim": 4}
    ).eval()
    images = torch.rand(3, 3, 70, 50, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(images)
        cast = copy.deepcopy(model).to(dtype)(images)
    assert cast.dtype == dtype
    torch.testing.assert_close(cast.float(), reference, rtol=0.1, atol=0.1)


def test_images_without_values_or_dense_layout_and_raw_uint8_grids_are_refused():
    from encoder_fusion.encoders import build_encoder
    from encoder_fusion.encoders.tiny import tiny_spec

    clip = build_encoder(tiny_spec("clip"))
    images = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"images for encoder 'clip' are on the meta device"):
        clip.preprocess(torch.empty(2, 3, 64, 64, device="meta"))
    with pytest.raises(TypeError, match=r"are a torch\.sparse_coo tensor; accepted: a dense tensor"):
        clip.preprocess(images.to_sparse())
    with pytest.raises(
        ValueError, match=r"got torch\.uint8 images in forward_tokens / forward_grids.*preprocess"
    ):
        clip.forward_grids((images * 255).to(torch.uint8))


def test_an_encoder_image_size_below_its_patch_is_refused_at_build():
    import dataclasses

    from encoder_fusion.encoders import build_encoder
    from encoder_fusion.encoders.tiny import tiny_spec

    with pytest.raises(
        ValueError, match=r"EncoderSpec\.image_size=\(8, 40\) for encoder 'clip' is smaller than one 16-pixel"
    ):
        build_encoder(dataclasses.replace(tiny_spec("clip"), image_size=(8, 40)))
