"""The cheap probes: k-NN on the mean fused token against a brute-force reference; a planted signal
found without training."""

from __future__ import annotations

import math

import pytest
import torch

from encoder_fusion import EncoderGeometry, FusionHead
from encoder_fusion.benchmarks.options import OptionError
from encoder_fusion.benchmarks.tasks import FeatureSplit, run_probe
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
