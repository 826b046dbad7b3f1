"""Accuracy probes: honest on label-carrying and noise features, reproducible, right metrics, real data."""

from __future__ import annotations

import collections
import json
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from encoder_fusion import EncoderGeometry, FusionHead
from encoder_fusion.benchmarks.datasets import build_dataset, build_train_test, load_batch, stratified_split
from encoder_fusion.benchmarks.tasks import TASKS, FeatureSplit, ProbeRecipe, run_probe
from encoder_fusion.benchmarks.tasks.classification import top1
from encoder_fusion.benchmarks.tasks.dense import confusion_matrix, masks_to_grid, segmentation_scores
from encoder_fusion.benchmarks.tasks.localization import box_iou_pairs
from encoder_fusion.encoders import build_encoder
from encoder_fusion.encoders.tiny import tiny_spec

CONNECTOR = {"kind": "mlp", "depth": 2, "out_dim": 16}


@pytest.fixture(autouse=True)
def one_thread():
    """The probes here train on tensors of a few kilobytes: one intra-op thread is fastest, and on a
    busy machine a second one spends its time waiting at barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def head_factory(geometries, grid, **options):
    return lambda: FusionHead(geometries, grid=grid, connector=CONNECTOR, **options)


def carrying(
    labels: torch.Tensor, num_classes: int, grid, width: int, noise: float, generator
) -> torch.Tensor:
    """A feature grid whose first channels are the one-hot label at every cell, plus Gaussian noise."""
    features = torch.randn(len(labels), *grid, width, generator=generator) * noise
    features[..., :num_classes] += F.one_hot(labels, num_classes).float()[:, None, None, :]
    return features


@pytest.fixture(scope="module")
def honesty_features():
    generator = torch.Generator().manual_seed(1)
    classes = 4
    labels = {"train": torch.randint(0, classes, (120,), generator=generator)}
    labels["test"] = torch.randint(0, classes, (80,), generator=generator)
    informative = {k: carrying(v, classes, (4, 4), 8, 1.0, generator) for k, v in labels.items()}
    noise = {k: torch.randn(len(v), 2, 2, 6, generator=generator) for k, v in labels.items()}
    geometry = {
        "informative": EncoderGeometry("informative", 8, (4, 4), 1),
        "noise": EncoderGeometry("noise", 6, (2, 2), 1),
    }
    return classes, labels, informative, noise, geometry


def classification_probe(encoders, honesty_features, seeds=(0, 1)):
    classes, labels, informative, noise, geometry = honesty_features
    features = {"informative": informative, "noise": noise}
    splits = {
        split: FeatureSplit(
            grids=[[features[name][split]] for name in encoders], labels=labels[split], num_classes=classes
        )
        for split in ("train", "test")
    }
    make_head = head_factory([geometry[name] for name in encoders], (4, 4))
    return run_probe(
        "classification", make_head, splits["train"], splits["test"], ProbeRecipe(seeds=seeds, epochs=30)
    )


def test_honesty_label_carrying_noise_and_fused(honesty_features):
    informative = classification_probe(["informative"], honesty_features)
    noise = classification_probe(["noise"], honesty_features)
    fused = classification_probe(["informative", "noise"], honesty_features)
    chance = max(collections.Counter(honesty_features[1]["test"].tolist()).values()) / 80
    assert informative.mean >= 0.95, informative
    assert noise.mean <= chance + 0.15, noise
    assert fused.mean >= noise.mean + 0.4 and fused.mean >= 0.9, (fused, noise)
    assert informative.extra["baseline"]["top1"] == pytest.approx(noise.extra["baseline"]["top1"])


def test_probes_read_the_deepstack_extra_sets(honesty_features):
    """One encoder hooks a noise layer and a label-carrying one; ``last`` takes the noise as the main
    tokens, so the label reaches the probe only through the DeepStack set of the other layer."""
    classes, labels, informative, _, _ = honesty_features
    generator = torch.Generator().manual_seed(2)
    noise = {split: torch.randn(grid.shape, generator=generator) for split, grid in informative.items()}
    splits = [
        FeatureSplit([[informative[s], noise[s]]], labels=labels[s], num_classes=classes)
        for s in ("train", "test")
    ]
    geometry = [EncoderGeometry("enc", 8, (4, 4), 2, (3, 7))]
    results = {
        deepstack: run_probe(
            "classification",
            head_factory(
                geometry, (4, 4), layer_merge="last", deepstack_layers={"enc": [3]} if deepstack else None
            ),
            *splits,
            ProbeRecipe(seeds=(0,), epochs=30),
        ).mean
        for deepstack in (False, True)
    }
    chance = max(collections.Counter(labels["test"].tolist()).values()) / len(labels["test"])
    assert results[False] <= chance + 0.15, results
    assert results[True] >= 0.9, results


def test_fixed_seeds_give_identical_results_and_leave_global_rng_alone(honesty_features):
    state = torch.random.get_rng_state()
    first = classification_probe(["informative", "noise"], honesty_features, seeds=(3, 5))
    assert torch.equal(torch.random.get_rng_state(), state)
    again = classification_probe(["informative", "noise"], honesty_features, seeds=(3, 5))
    assert first == again and torch.equal(first.item_stats, again.item_stats)
    assert first.per_seed != classification_probe(["noise"], honesty_features, seeds=(3, 5)).per_seed
    assert first.std == pytest.approx(statistics.stdev(first.per_seed))
    assert first.mean == pytest.approx(statistics.fmean(first.per_seed))
    assert (first.task, first.metric, first.seeds) == ("classification", "top1", [3, 5])
    assert (first.train_size, first.test_size) == (120, 80)
    single = classification_probe(["informative"], honesty_features, seeds=(3,))
    assert single.std == 0.0 and len(single.per_seed) == 1


def layered_probe(layer_merge, seeds):
    """A classification probe on two encoders with several hooked layers each (the label in layer 1
    of the first only), keeping every fusion head ``make_head`` builds; returns (result, heads)."""
    generator = torch.Generator().manual_seed(7)
    classes, sizes = 3, {"train": 90, "test": 45}
    labels = {split: torch.randint(0, classes, (n,), generator=generator) for split, n in sizes.items()}
    splits = {
        split: FeatureSplit(
            grids=[
                [
                    torch.randn(len(y), 3, 5, 8, generator=generator),
                    carrying(y, classes, (3, 5), 8, 0.5, generator),
                    torch.randn(len(y), 3, 5, 8, generator=generator),
                ],
                [torch.randn(len(y), 2, 3, 5, generator=generator) for _ in range(2)],
            ],
            labels=y,
            num_classes=classes,
        )
        for split, y in labels.items()
    }
    geometries = [EncoderGeometry("mixed", 8, (3, 5), 3), EncoderGeometry("noise", 5, (2, 3), 2)]
    make_head = head_factory(geometries, (3, 5), layer_merge=layer_merge)
    heads = []

    def tracked():
        heads.append(make_head())
        return heads[-1]

    result = run_probe(
        "classification", tracked, splits["train"], splits["test"], ProbeRecipe(seeds=seeds, epochs=12)
    )
    return result, heads


def test_weighted_ln_layer_weights_are_those_of_the_trained_heads():
    result, heads = layered_probe("weighted_ln", seeds=(2, 9, 4))
    assert len(heads) == 3
    extra = result.extra
    per_seed = [head.layer_weights() for head in heads]  # the heads as run_probe left them, trained
    assert extra["layer_weights_per_seed"] == {
        name: [weights[name] for weights in per_seed] for name in ("mixed", "noise")
    }
    for index, name in enumerate(("mixed", "noise")):
        # an independent reference: the softmax of each trained head's logits, in float64
        softmaxes = torch.stack([torch.softmax(h.combines[index].logits.double(), 0) for h in heads])
        torch.testing.assert_close(
            torch.tensor(extra["layer_weights"][name], dtype=torch.float64), softmaxes.mean(0)
        )
        assert len(extra["layer_weights"][name]) == (3, 2)[index]
        assert sum(extra["layer_weights"][name]) == pytest.approx(1.0, abs=1e-6)
        assert all(
            sum(seed) == pytest.approx(1.0, abs=1e-6) for seed in extra["layer_weights_per_seed"][name]
        )
    # read after training: the logits left zero (uniform weights), the label-carrying layer favoured
    mixed = extra["layer_weights"]["mixed"]
    assert max(mixed) - min(mixed) > 1e-3, mixed
    assert mixed.index(max(mixed)) == 1, mixed
    json.dumps(result.to_dict())  # report.json carries the result as it is


def test_no_layer_weights_without_a_learned_layer_merge():
    result, heads = layered_probe("last", seeds=(0,))
    assert heads[0].layer_weights() == {}
    assert "layer_weights" not in result.extra and "layer_weights_per_seed" not in result.extra


@pytest.fixture(scope="module")
def synthetic_grids():
    """Synthetic shapes, 8x8 grids: features that carry the cell's mask class, and pure noise."""
    train, test = build_train_test("synthetic", num_images=160, image_size=32, seed=0)
    classes = train.num_mask_classes
    generator = torch.Generator().manual_seed(2)
    out = {}
    for split, dataset in (("train", train), ("test", test)):
        batch = load_batch(dataset, range(len(dataset)), 32)
        cells = masks_to_grid(batch["masks"], (8, 8), classes)
        informative = torch.randn(len(dataset), 8, 8, 12, generator=generator) * 0.2
        informative[..., :classes] += F.one_hot(cells, classes).float()
        noise = torch.randn(len(dataset), 8, 8, 12, generator=generator)
        out[split] = (batch, informative, noise)
    return classes, out


@pytest.mark.parametrize(
    ("task", "target", "threshold", "margin"),
    [("dense", "masks", 0.7, 0.4), ("localization", "boxes", 0.6, 0.2)],
)
def test_spatial_probes_read_what_the_features_carry(synthetic_grids, task, target, threshold, margin):
    classes, data = synthetic_grids
    make_head = head_factory([EncoderGeometry("enc", 12, (8, 8), 1)], (8, 8))
    results = {}
    for kind, column in (("informative", 1), ("noise", 2)):
        splits = [
            FeatureSplit([[data[s][column]]], num_classes=classes, **{target: data[s][0][target]})
            for s in ("train", "test")
        ]
        results[kind] = run_probe(task, make_head, *splits, ProbeRecipe(epochs=30))
    informative, noise = results["informative"], results["noise"]
    assert informative.mean >= threshold, informative
    assert informative.mean >= noise.mean + margin, (informative, noise)
    baseline = informative.extra["baseline"][informative.metric]
    assert noise.mean <= baseline + 0.1, (noise, baseline)


@pytest.mark.parametrize(
    ("task", "target"), [("classification", "labels"), ("dense", "masks"), ("localization", "boxes")]
)
def test_item_statistics_give_back_each_seeds_metric(synthetic_grids, task, target):
    """The per-item statistics the paired intervals resample reproduce every seed's metric when summed
    over all test items, one row per test item."""
    classes, data = synthetic_grids
    num_classes = classes - 1 if task == "classification" else classes  # the shapes, without background
    make_head = head_factory([EncoderGeometry("enc", 12, (8, 8), 1)], (8, 8))
    train, test = (
        FeatureSplit([[data[s][1]]], num_classes=num_classes, **{target: data[s][0][target]})
        for s in ("train", "test")
    )
    result = run_probe(task, make_head, train, test, ProbeRecipe(seeds=(0, 3), epochs=2))
    items = result.item_stats
    assert items.shape[:2] == (2, result.test_size)
    recomputed = TASKS[task].metric_from_sums(items.sum(1))
    torch.testing.assert_close(recomputed, torch.tensor(result.per_seed, dtype=torch.float64))


def test_dense_probe_through_sequence_concat_to_grid(synthetic_grids):
    classes, data = synthetic_grids
    geometries = [EncoderGeometry("a", 12, (8, 8), 1), EncoderGeometry("b", 12, (8, 8), 1)]
    make_head = head_factory(geometries, (8, 8), encoder_merge="sequence_concat", merge_dim=16)
    train, test = (
        FeatureSplit([[data[s][1]], [data[s][2]]], masks=data[s][0]["masks"], num_classes=classes)
        for s in ("train", "test")
    )
    result = run_probe("dense", make_head, train, test, ProbeRecipe(epochs=10))
    assert 0.0 <= result.mean <= 1.0 and 0.0 <= result.extra["pixel_accuracy"]["mean"] <= 1.0
    assert result.mean > result.extra["baseline"]["miou"]


# -- real data, tiny random encoders ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_encoders():
    torch.manual_seed(0)
    return [
        build_encoder(tiny_spec("clip", layers=[1, 3])),
        build_encoder(tiny_spec("dino_reg", layers=[-1])),
    ]


def extract(encoders, dataset, image_size=64) -> tuple[list[list[torch.Tensor]], dict]:
    batch = load_batch(dataset, range(len(dataset)), image_size)
    with torch.no_grad():
        grids = [encoder.forward_grids(encoder.preprocess(batch["images"])) for encoder in encoders]
    return grids, batch


def geometries_of(encoders):
    return [EncoderGeometry.of(e) for e in encoders]


@pytest.mark.parametrize("task", ["dense", "localization", "classification"])
def test_probes_end_to_end_on_coco128(datasets_root, tiny_encoders, task):
    train, test = build_train_test("coco128", datasets_root, limit=24, require=["mask", "box"], seed=1)
    splits = []
    for dataset in (train, test):
        grids, batch = extract(tiny_encoders, dataset)
        classes = dataset.num_mask_classes if task == "dense" else dataset.num_classes
        splits.append(FeatureSplit(grids, batch["labels"], batch["masks"], batch["boxes"], classes))
    result = run_probe(
        task, head_factory(geometries_of(tiny_encoders), (4, 4)), *splits, ProbeRecipe(seeds=(0, 1), epochs=3)
    )
    assert result.task == task and len(result.per_seed) == 2
    metrics = {k: m for k, m in result.extra.items() if not k.startswith("layer_weights")}
    values = [result.mean, *result.per_seed] + [
        v for m in metrics.values() if isinstance(m, dict) for v in m.get("per_seed", m.values())
    ]
    assert all(0.0 <= v <= 1.0 for v in values), result
    # the default weighted_ln combine: one weight per hooked layer of each encoder, summing to 1
    learned = result.extra["layer_weights"]
    assert {name: len(w) for name, w in learned.items()} == {
        e.spec.name: len(e.layer_indices) for e in tiny_encoders
    }
    assert all(sum(w) == pytest.approx(1.0, abs=1e-6) for w in learned.values())
    assert (result.train_size, result.test_size) == (18, 6)


def test_classification_end_to_end_on_tinyimagenet(datasets_root, tiny_encoders):
    dataset = build_dataset("tinyimagenet", datasets_root, limit=400, seed=0)
    train_idx, test_idx = (torch.tensor(i) for i in stratified_split(dataset.labels, 0.5, seed=0))
    grids, batch = extract(tiny_encoders, dataset, image_size=64)
    split = lambda idx: FeatureSplit(
        [[g[idx] for g in layers] for layers in grids], labels=batch["labels"][idx], num_classes=200
    )
    result = run_probe(
        "classification",
        head_factory(geometries_of(tiny_encoders), (4, 4)),
        split(train_idx),
        split(test_idx),
        ProbeRecipe(epochs=2),
    )
    assert 0.0 <= result.mean <= 1.0 and (result.train_size, result.test_size) == (200, 200)


# -- metrics against independent references --------------------------------------------------------
def test_top1_hand_worked():
    logits = torch.tensor([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.2, 0.1], [0.3, 0.2, 0.4]])
    assert top1(logits, torch.tensor([1, 0, 2, 2])) == pytest.approx(0.75)


def test_segmentation_scores_hand_worked():
    target = torch.tensor([[0, 0, 1], [1, 2, -1]])
    predicted = torch.tensor([[0, 1, 1], [1, 1, 2]])
    confusion = confusion_matrix(predicted, target, num_classes=4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    scores = segmentation_scores(confusion)
    # IoU: class 0 = 1/2, class 1 = 2/4, class 2 = 0/1; class 3 is absent from both and not averaged
    assert scores["miou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)


def test_box_iou_pairs_matches_torchvision():
    generator = torch.Generator().manual_seed(4)
    corners = torch.rand(37, 2, 2, generator=generator, dtype=torch.float64)
    boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)
    others = boxes.roll(1, dims=0)
    others[:5] = boxes[:5]  # identical pairs
    others[5] = torch.tensor([0.9, 0.9, 0.95, 0.95], dtype=torch.float64)
    boxes[5] = torch.tensor([0.0, 0.0, 0.1, 0.1], dtype=torch.float64)  # a disjoint pair
    expected = box_iou(boxes, others).diagonal()
    torch.testing.assert_close(box_iou_pairs(boxes, others), expected)
    assert box_iou_pairs(boxes[:5], others[:5]).tolist() == [1.0] * 5 and box_iou_pairs(boxes, others)[5] == 0


def majority_reference(mask: np.ndarray, grid_hw, num_classes: int) -> np.ndarray:
    """Cell (i, j) covers pixel rows y with floor(y * H / H_img) == i (columns likewise)."""
    height, width = grid_hw
    out = np.full(grid_hw, -1)
    for i in range(height):
        for j in range(width):
            rows = [y for y in range(mask.shape[0]) if y * height // mask.shape[0] == i]
            cols = [x for x in range(mask.shape[1]) if x * width // mask.shape[1] == j]
            votes = collections.Counter(int(v) for v in mask[np.ix_(rows, cols)].ravel() if v >= 0)
            if votes:
                top = max(votes.values())
                out[i, j] = min(k for k, v in votes.items() if v == top)
    return out


@pytest.mark.parametrize(
    ("shape", "grid"), [((3, 17, 23), (4, 5)), ((2, 9, 9), (3, 3)), ((1, 14, 6), (5, 2))]
)
def test_masks_to_grid_matches_a_direct_vote(shape, grid):
    generator = torch.Generator().manual_seed(sum(shape))
    masks = torch.randint(-1, 6, shape, generator=generator)
    masks[0, : shape[1] // 2, : shape[2] // 2] = -1  # a fully ignored corner
    got = masks_to_grid(masks, grid, num_classes=6)
    for index in range(shape[0]):
        assert got[index].tolist() == majority_reference(masks[index].numpy(), grid, 6).tolist()


def test_masks_to_grid_upsamples_by_nearest():
    masks = torch.randint(-1, 4, (2, 3, 3), generator=torch.Generator().manual_seed(0))
    expected = masks.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert torch.equal(masks_to_grid(masks, (6, 6), num_classes=4), expected)


@pytest.mark.parametrize(
    ("task", "field", "shape"), [("classification", "labels", (5,)), ("dense", "masks", (5, 3, 7))]
)
def test_class_id_targets_are_checked(task, field, shape):
    grids = [[torch.randn(5, 2, 3, 4)]]
    good = torch.randint(-1, 3, shape)
    TASKS[task].check(FeatureSplit(grids, num_classes=3, **{field: good}), "train")
    with pytest.raises(ValueError, match=f"the {task} probe needs train num_classes >= 2, got 1"):
        TASKS[task].check(FeatureSplit(grids, num_classes=1, **{field: good.clamp(max=0)}), "train")
    for bad in (3, -2):
        ids = good.clone()
        ids.view(-1)[1] = bad
        with pytest.raises(
            ValueError, match=rf"test FeatureSplit\.{field} must be long class ids in \[0, 3\) or -1"
        ):
            TASKS[task].check(FeatureSplit(grids, num_classes=3, **{field: ids}), "test")
    with pytest.raises(ValueError, match=r"got dtype torch\.float32, range \[-1, 2\]"):
        float_ids = good.float()
        float_ids.view(-1)[:2] = torch.tensor([-1.0, 2.0])
        TASKS[task].check(FeatureSplit(grids, num_classes=3, **{field: float_ids}), "train")


# -- errors ----------------------------------------------------------------------------------------
def test_run_probe_errors(honesty_features):
    classes, labels, informative, noise, geometry = honesty_features
    make_head = head_factory([geometry["informative"]], (4, 4))
    train = FeatureSplit([[informative["train"]]], labels=labels["train"], num_classes=classes)
    test = FeatureSplit([[informative["test"]]], labels=labels["test"], num_classes=classes)
    with pytest.raises(ValueError, match=f"task='depth' is unknown; accepted: {', '.join(sorted(TASKS))}"):
        run_probe("depth", make_head, train, test)
    with pytest.raises(ValueError, match=r"dense probe needs train FeatureSplit\.masks, got None"):
        run_probe("dense", make_head, train, test)
    with pytest.raises(ValueError, match=r"localization probe needs train FeatureSplit\.boxes"):
        run_probe("localization", make_head, train, test)
    for field, value in (("epochs", 0), ("batch_size", -2), ("lr", 0.0), ("seeds", []), ("seeds", [0.5])):
        with pytest.raises(ValueError, match=f"^{field}=.* must be"):
            ProbeRecipe(**{field: value})
    with pytest.raises(ValueError, match="make_head must be a callable"):
        run_probe("classification", None, train, test)
    with pytest.raises(ValueError, match=r"make_head\(\) must return an nn\.Module"):
        run_probe("classification", lambda: "head", train, test)
    wrong = FeatureSplit([[noise["test"]]], labels=labels["test"], num_classes=classes)
    with pytest.raises(ValueError, match="train and test FeatureSplit grids differ"):
        run_probe("classification", make_head, train, wrong)
    out_of_range = FeatureSplit([[informative["test"]]], labels=labels["test"] + 4, num_classes=classes)
    with pytest.raises(
        ValueError, match=r"test FeatureSplit\.labels must be long class ids in \[0, 4\) or -1"
    ):
        run_probe("classification", make_head, train, out_of_range)
    unlabelled = FeatureSplit([[informative["test"]]], labels=torch.full((80,), -1), num_classes=classes)
    with pytest.raises(ValueError, match="test split has no sample with a usable labels target"):
        run_probe("classification", make_head, train, unlabelled)
    half_box = torch.rand(80, 4).sort(dim=1).values
    half_box[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"test FeatureSplit\.boxes must be normalised xyxy"):
        run_probe(
            "localization",
            make_head,
            FeatureSplit([[informative["train"]]], boxes=torch.rand(120, 4).sort(dim=1).values),
            FeatureSplit([[informative["test"]]], boxes=half_box),
        )


def test_feature_split_errors():
    grid = torch.randn(5, 2, 2, 3)
    with pytest.raises(ValueError, match=r"FeatureSplit\.grids must be a non-empty list"):
        FeatureSplit([])
    with pytest.raises(
        ValueError,
        match=r"FeatureSplit.grids\[0\]\[1\] must be a float \(N, h, w, C\) tensor, got \(5, 2, 2\)",
    ):
        FeatureSplit([[grid, grid[..., 0]]])
    with pytest.raises(ValueError, match=r"share one non-zero sample count N, got \[4, 5\]"):
        FeatureSplit([[grid], [grid[:4]]])
    with pytest.raises(ValueError, match=r"FeatureSplit.labels must have shape \(5\) for N=5, got \(4,\)"):
        FeatureSplit([[grid]], labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"FeatureSplit.boxes must have shape \(5, 4\)"):
        FeatureSplit([[grid]], boxes=torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"FeatureSplit.masks must have shape \(5, \*, \*\)"):
        FeatureSplit([[grid]], masks=torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes must be an int >= 0, got -1"):
        FeatureSplit([[grid]], num_classes=-1)
