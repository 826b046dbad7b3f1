"""The cheap probes: k-NN on the mean fused token against a brute-force reference, a planted signal
found without training; correspondence PCK for an identity warp and a hand-built shift."""

from __future__ import annotations

import math

import pytest
import torch

from encoder_fusion import EncoderGeometry, FusionHead
from encoder_fusion.benchmarks.options import OptionError
from encoder_fusion.benchmarks.tasks import FeatureSplit, run_probe
from encoder_fusion.benchmarks.tasks.correspondence import (
    WarpOptions,
    inside,
    pck_items,
    run_correspondence,
    warp_images,
)
from encoder_fusion.benchmarks.tasks.knn import KnnTask, knn_votes
from encoder_fusion.benchmarks.tasks.probe import ProbeRecipe
from encoder_fusion.encoders import build_encoder
from encoder_fusion.encoders.tiny import tiny_spec


def brute_force_knn(queries, bank, labels, k, num_classes):
    """Per query: the k most cosine-similar bank rows, one by one; the most frequent class, ties to
    the larger summed similarity."""
    predictions = []
    for query in queries.double():
        similarities = [float(query @ row / (query.norm() * row.norm())) for row in bank.double()]
        nearest = sorted(range(len(bank)), key=lambda i: -similarities[i])[:k]
        counts = [0] * num_classes
        sums = [0.0] * num_classes
        for i in nearest:
            counts[int(labels[i])] += 1
            sums[int(labels[i])] += similarities[i]
        predictions.append(max(range(num_classes), key=lambda c: (counts[c], sums[c])))
    return predictions


@pytest.mark.parametrize(("k", "classes"), [(1, 3), (5, 4), (7, 2), (30, 5)])
def test_knn_votes_equal_a_brute_force_reference(k, classes):
    generator = torch.Generator().manual_seed(k * 10 + classes)
    bank = torch.randn(23, 7, generator=generator)
    labels = torch.randint(0, classes, (23,), generator=generator)
    queries = torch.randn(11, 7, generator=generator)
    votes = knn_votes(queries, bank, labels, k, classes)
    assert votes.argmax(1).tolist() == brute_force_knn(queries, bank, labels, k, classes)
    assert torch.allclose(votes.floor().sum(1), torch.full((11,), float(min(k, 23))))


def test_knn_needs_no_training_and_finds_a_planted_signal():
    clip = build_encoder(tiny_spec("clip", layers=[-1]))
    geometries = [EncoderGeometry.of(clip)]
    directions = torch.randn(4, 32, generator=torch.Generator().manual_seed(9))

    def split(n, seed, planted):
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 4, (n,), generator=generator)
        grid = torch.randn(n, 4, 4, 32, generator=generator) + planted * directions[labels][:, None, None]
        return FeatureSplit([[grid]], labels=labels, num_classes=4)

    def probe(planted):
        head = lambda: FusionHead(geometries, connector={"kind": "mlp", "out_dim": 32})
        return run_probe(
            KnnTask(5), head, split(60, 1, planted), split(40, 2, planted), ProbeRecipe(seeds=(0, 1))
        )

    planted, plain = probe(2.0), probe(0.0)
    assert planted.mean == 1.0 and plain.mean < 0.5
    assert "train_loss" not in planted.extra  # nothing trained
    assert planted.item_stats.shape == (2, 40, 2)
    assert math.isclose(plain.mean, float(plain.item_stats[..., 0].sum() / plain.item_stats[..., 1].sum()))


@pytest.mark.parametrize("k", [0, -1, 2.5, "3"])
def test_a_bad_k_is_refused(k):
    with pytest.raises(OptionError, match=r"\{k\}|k=.* must be an int >= 1"):
        KnnTask(k)


# -- correspondence ---------------------------------------------------------------------------------
def test_an_identity_warp_matches_every_token():
    identity = WarpOptions(rotate=0, scale=1, shift=(0, 0))
    tokens = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(1))
    stats = pck_items(tokens, tokens, (4, 5), identity.theta(), threshold=0.5)
    assert stats.tolist() == [[20.0, 20.0]] * 3
    images = torch.randint(0, 256, (2, 3, 9, 11), dtype=torch.uint8)
    assert torch.equal(warp_images(images, identity.theta()), images)


def test_a_hand_built_shift_of_one_cell_gives_a_known_pck():
    """Shifted right by one cell of a 4x4 grid, the warped image's columns 0-2 show the original's
    columns 1-3 and its column 3 lies outside (not counted); two of the 12 shown cells are swapped,
    so 10 of 12 match within half a cell."""
    shift = WarpOptions(rotate=0, scale=1, shift=(0.5, 0))
    assert inside(shift.theta(), (4, 4)).view(4, 4)[:, 3].tolist() == [False] * 4
    grid = torch.randn(1, 4, 4, 8, generator=torch.Generator().manual_seed(2))
    warped = torch.randn(1, 4, 4, 8, generator=torch.Generator().manual_seed(3))
    warped[:, :, :3] = grid[:, :, 1:]
    warped[:, 0, 0], warped[:, 0, 1] = grid[:, 0, 2].clone(), grid[:, 0, 1].clone()  # a swapped pair
    stats = pck_items(grid.flatten(1, 2), warped.flatten(1, 2), (4, 4), shift.theta(), threshold=0.5)
    assert stats.tolist() == [[10.0, 12.0]]
    # one cell off counts within a radius of one cell
    assert pck_items(grid.flatten(1, 2), warped.flatten(1, 2), (4, 4), shift.theta(), 1.0).tolist() == [
        [12.0, 12.0]
    ]


def test_the_correspondence_probe_on_real_encoder_features():
    clip = build_encoder(tiny_spec("clip", layers=[-1]))
    images = torch.randint(
        0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)
    )
    grids = lambda batch: [[clip.forward_grids(clip.preprocess(batch))[0]]]
    head = lambda: FusionHead([EncoderGeometry.of(clip)], connector={"kind": "mlp", "out_dim": 32})
    identity = WarpOptions(rotate=0, scale=1, shift=(0, 0))
    with torch.no_grad():
        same = run_correspondence(
            head, FeatureSplit(grids(images)), grids(images)[0:1], identity, [0, 1], torch.device("cpu")
        )
        warp = WarpOptions(rotate=0, scale=1, shift=(0, 0), flip=True)
        flipped = grids(warp_images(images, warp.theta()))
        moved = run_correspondence(head, FeatureSplit(grids(images)), flipped, warp, [0], torch.device("cpu"))
    assert same.mean == 1.0 and same.metric == "pck" and same.item_stats.shape == (2, 4, 2)
    assert 0.0 <= moved.mean < 1.0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"shift": (3.0, 0.0)}, r"leaves no overlap between an image and its warp"),
        ({"scale": 0}, r"scale.*must be a positive"),
        ({"threshold": -1}, r"threshold.*must be a positive"),
        ({"flip": "yes"}, r"flip.*must be true or false"),
    ],
)
def test_bad_warps_are_refused(fields, message):
    with pytest.raises(OptionError, match=message):
        WarpOptions(**fields)
