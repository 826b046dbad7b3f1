"""The stage-1 VLM probe: its questions from the labels, multiple-choice scoring against a hand
computation on a fixed model, training of the fusion head only, per-item results, a planted signal
found, and a whole run."""

from __future__ import annotations

import json

import pytest
import torch
from bench_runs import CONF, check_report
from hydra import compose, initialize_config_dir

from encoder_fusion import EncoderGeometry, FusedEncoder, FusionHead
from encoder_fusion.benchmarks.config.plan import llm_preset
from encoder_fusion.benchmarks.run import run_benchmark
from encoder_fusion.benchmarks.tasks import FeatureSplit, run_probe
from encoder_fusion.benchmarks.tasks.probe import ProbeModel, ProbeRecipe, fit
from encoder_fusion.benchmarks.tasks.vlm import (
    SIZES,
    WHERE,
    VlmContext,
    VlmProbeOptions,
    VlmTask,
    answer_targets,
)
from encoder_fusion.benchmarks.tasks.vlm_scoring import AnswerScorer
from encoder_fusion.benchmarks.tasks.vlm_text import Vocabulary
from encoder_fusion.benchmarks.timing.llm import build_language_model
from encoder_fusion.encoders import build_encoder
from encoder_fusion.encoders.tiny import tiny_spec
from encoder_fusion.hf import build_vlm

CLASSES = ["circle", "square", "star", "heart", "ring", "cross"]
MASK_CLASSES = ["background", *CLASSES]  # as the synthetic data names them: mask value = label + 1
TEMPLATES = {"class": "what is it ?", "where": "where is it ?", "size": "how big is it ?"}
CONNECTOR = {"kind": "mlp", "out_dim": 32}


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_encoder(tiny_spec("clip", layers=[-1]))


@pytest.fixture(scope="module")
def task(clip):
    spec = llm_preset("tiny")
    language_model = build_language_model(spec, torch.device("cpu"), torch.float32, seed=0)
    vlm = build_vlm(
        FusedEncoder([clip], connector=CONNECTOR), language_model, image_token_id=spec.vocab_size - 1
    )
    vlm.requires_grad_(False)
    return VlmTask(VlmContext(vlm, VlmProbeOptions(templates=TEMPLATES, options=4), CLASSES, MASK_CLASSES))


def features(n: int, seed: int, planted: float = 0.0) -> FeatureSplit:
    """Random (n, 4, 4, 32) grids; ``planted`` adds each class's own direction to every cell."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (n,), generator=generator)
    directions = torch.randn(len(CLASSES), 32, generator=torch.Generator().manual_seed(99))
    grid = torch.randn(n, 4, 4, 32, generator=generator) + planted * directions[labels][:, None, None]
    corner = torch.rand(n, 2, generator=generator) * 0.5
    boxes = torch.cat([corner, corner + 0.45], dim=1)
    shape = torch.rand(n, 8, 8, generator=generator) < torch.rand(n, 1, 1, generator=generator)
    masks = shape.long() * (labels[:, None, None] + 1)
    return FeatureSplit([[grid]], labels=labels, boxes=boxes, masks=masks, num_classes=len(CLASSES))


def head_factory(clip):
    geometries = [EncoderGeometry.of(clip)]
    return lambda: FusionHead(geometries, connector=CONNECTOR)


def test_questions_come_from_the_labels_boxes_and_masks(task):
    labels = torch.tensor([0, 5, -1])
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.6, 0.1, 0.9, 0.3], [float("nan")] * 4])
    masks = torch.zeros(3, 10, 10, dtype=torch.long)
    masks[0, :2] = 1  # 20 % of the pixels are the label's class (circle, mask value 1): medium
    masks[0, 2:5] = 2  # 30 % another class, not the labelled object's
    masks[1, :6] = 6  # 60 %: cross, large
    masks[2] = -1  # all ignored: not asked
    split = FeatureSplit([[torch.zeros(3, 2, 2, 4)]], labels=labels, boxes=boxes, masks=masks, num_classes=6)
    targets = answer_targets(split, task.context)
    assert torch.equal(targets, answer_targets(split, task.context))  # one fixed draw
    phrases = task.context.phrases()
    for b, label in ((0, 0), (1, 5)):  # class: the right class and three others
        options = targets[b, 0, 1:].tolist()
        assert len(set(options)) == 4 and max(options) < len(CLASSES)
        assert phrases[options[targets[b, 0, 0]]] == CLASSES[label]
    where = [phrases[i] for i in targets[1, 1, 1:].tolist()]
    assert sorted(where) == sorted(WHERE) and where[targets[1, 1, 0]] == "top right"
    assert phrases[targets[0, 1, 1 + targets[0, 1, 0]]] == "top left"
    size = [phrases[i] for i in targets[0, 2, 1:4].tolist()]
    assert sorted(size) == sorted(SIZES) and targets[0, 2, 4] == -1  # three sizes, the fourth empty
    assert size[targets[0, 2, 0]] == "medium"
    assert phrases[targets[1, 2, 1 + targets[1, 2, 0]]] == "large"
    assert (targets[2, :, 0] == -1).all()  # no label, box or mask: never asked
    assert task.valid(targets).tolist() == [True, True, False]


def test_multiple_choice_scores_are_the_language_models_log_likelihoods(task):
    """The scorer's score of an option equals the summed log-probabilities of its tokens, computed by
    hand from the language model fed the visual tokens, the question and the option."""
    vlm = task.context.vlm
    head = task.build_head(32, (4, 4), len(CLASSES))
    assert isinstance(head, AnswerScorer)
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randn(2, 16, 32, generator=generator)
    split = features(2, seed=6)
    targets = answer_targets(split, task.context)
    with torch.no_grad():
        scores = head(tokens, [], targets)
    vocabulary = Vocabulary([*TEMPLATES.values(), *task.context.phrases()], vlm.config.image_token_id)
    # the words' ids in sorted order, the end of an answer after them
    words = sorted({w for text in [*TEMPLATES.values(), *task.context.phrases()] for w in text.split()})
    assert vocabulary.ids == {w: i + 1 for i, w in enumerate(words)}
    embed = vlm.get_input_embeddings()
    language_model = vlm.model.language_model
    for b in range(2):
        for t, question in enumerate(TEMPLATES.values()):
            for o in range(4):
                phrase = int(targets[b, t, 1 + o])
                if phrase < 0:
                    assert scores[b, t, o] == float("-inf")
                    continue
                answer = vocabulary.encode(task.context.phrases()[phrase])
                ids = torch.tensor(vocabulary.encode(question) + answer)
                with torch.no_grad():
                    embeds = torch.cat([tokens[b], embed(ids)])[None]
                    logits = vlm.lm_head(language_model(inputs_embeds=embeds).last_hidden_state)[0]
                log_probs = logits.double().log_softmax(-1)
                start = 16 + len(vocabulary.encode(question))
                expected = sum(log_probs[start - 1 + k, token] for k, token in enumerate(answer))
                torch.testing.assert_close(scores[b, t, o].double(), expected, rtol=1e-5, atol=1e-5)
    right = scores.argmax(-1) == targets[:, :, 0]
    assert task.scores(scores, targets, 6)["accuracy"] == pytest.approx(right.sum().item() / 6)


def test_only_the_fusion_head_trains_and_its_loss_falls(task, clip):
    frozen = {name: p.detach().clone() for name, p in task.context.vlm.named_parameters()}
    fusion = head_factory(clip)()
    model = ProbeModel(fusion, task.build_head(32, (4, 4), 6), "vlm")
    split = features(32, seed=1, planted=2.0)
    targets = task.targets(split, (4, 4))
    before = [p.detach().clone() for p in fusion.parameters()]
    history = fit(
        model, task, split, targets, epochs=8, lr=3e-2, batch_size=16, weight_decay=0.0,
        generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
    )  # fmt: skip
    assert history[-1] < history[0] - 0.1
    assert all(torch.equal(p, frozen[name]) for name, p in task.context.vlm.named_parameters())
    assert any(not torch.equal(p, b) for p, b in zip(fusion.parameters(), before))


def test_the_probe_finds_a_planted_class_signal_and_scores_per_item(task, clip):
    recipe = ProbeRecipe(seeds=(0,), epochs=30, lr=3e-2, batch_size=16)
    planted = run_probe(
        task, head_factory(clip), features(48, 1, planted=2.0), features(24, 2, planted=2.0), recipe
    )
    plain = run_probe(task, head_factory(clip), features(48, 1), features(24, 2), recipe)
    assert planted.metric == "accuracy" and planted.item_stats.shape == (1, 24, 2)
    sums = planted.item_stats[0].sum(0)
    assert planted.mean == pytest.approx((sums[0] / sums[1]).item())
    assert planted.extra["accuracy_class"]["mean"] >= 0.9  # the planted class is read off the tokens
    assert plain.extra["accuracy_class"]["mean"] <= 0.6


def test_a_smoke_run_of_the_vlm_probe_and_the_cheap_probes_agreement(tmp_path):
    tasks = ["vlm", "knn", "correspondence", "classification"]
    overrides = [
        "experiment=smoke",
        f"task.names=[{','.join(tasks)}]",
        f"bench.cache_dir={tmp_path / 'cache'}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    path = run_benchmark(cfg, tmp_path / "run")
    report = check_report(path, tasks, "eagle")
    for record in report.strategies:
        accuracy = record.accuracy["vlm"]
        assert accuracy.metric == "accuracy" and 0.0 <= accuracy.mean <= 1.0
        assert "accuracy_class" in accuracy.extra  # task.names alone keeps the default: the class question
        assert record.accuracy["correspondence"].metric == "pck"
        assert all(record.accuracy[task].delta is not None for task in tasks)
    rows = json.loads(path.read_text())["probe_agreement"]
    assert [row["probe"] for row in rows] == ["knn", "correspondence", "classification"]
    for row in rows:
        assert set(row) >= {"probe", "spearman", "spearman_ci", "kendall", "kendall_ci", "strategies"}
        assert row["strategies"] == ["clip_only", "dino_only", "eagle"]
    markdown = (path.parent / "report.md").read_text()
    assert "## Can the cheap probes stand in for the VLM probe?" in markdown
