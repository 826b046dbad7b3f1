"""The shared probe: train the fusion head plus a small task head on cached features, evaluate it.

A probe task (:class:`encoder_fusion.benchmarks.tasks.base.ProbeTask`) says what differs between
tasks; :func:`run_probe` does the rest identically for all: a fresh fusion head per seed, AdamW
with a cosine schedule on the train split, one pass over the test split, mean and std over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from encoder_fusion.benchmarks.options import OptionError, check_positive, is_int
from encoder_fusion.benchmarks.reports.records import TaskAccuracy
from encoder_fusion.benchmarks.tasks.base import TASKS, FeatureSplit, Grids, ProbeTask


class FusionContract(Protocol):
    """What the probe calls on the fusion head ``make_head`` builds (an nn.Module besides): the
    forward contract of :class:`encoder_fusion.FusionHead`."""

    def __call__(self, grids: Grids) -> torch.Tensor: ...

    def forward_deepstack(self, grids: Grids) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor: ...


def _contract(fusion: nn.Module) -> FusionContract:
    """``fusion`` typed by the contract it is built to: a type checker reads a method an nn.Module
    does not declare as ``Tensor | Module`` (its ``__getattr__``), which cannot be called."""
    return cast(FusionContract, fusion)


class ProbeModel(nn.Module):
    """The fusion head followed by the task head.

    The task head sees the main tokens plus the sum of the fusion head's DeepStack extra token sets
    (``deepstack_layers``; none for most strategies): a language model adds those sets to its
    hidden states at the visual positions, so their sum is the closest stand-in a probe without a
    language model has for what they contribute.
    """

    def __init__(self, fusion: nn.Module, head: nn.Module, head_input: str) -> None:
        super().__init__()
        self.fusion, self.head, self.head_input = fusion, head, head_input

    def forward(self, grids: Grids, targets: torch.Tensor | None = None) -> torch.Tensor:
        fusion = _contract(self.fusion)
        tokens, extras = fusion.forward_deepstack(grids)
        if self.head_input == "vlm":  # a language model: the DeepStack sets go to its layers
            return self.head(tokens, extras, targets)
        tokens = sum(extras, tokens)
        return self.head(fusion.to_grid(tokens) if self.head_input == "grid" else tokens)


MAX_SEED = 2**63 - 1  # torch's and numpy's generators take any seed up to here


@dataclass(frozen=True)
class ProbeRecipe:
    """How every probe trains: one run per seed, AdamW with a cosine schedule, on ``device``.

    Raises:
        OptionError: naming the field, the value and what is accepted.
    """

    seeds: tuple[int, ...] = (0,)
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 32
    weight_decay: float = 0.01
    device: str = "cpu"

    def __post_init__(self) -> None:
        seeds = self.seeds
        seeds = [seeds] if is_int(seeds) else list(seeds)  # type: ignore[arg-type]  # a lone int is one seed
        if not seeds or not all(is_int(s) for s in seeds):
            raise OptionError("{seeds} must be a non-empty list of ints", {"seeds": seeds})
        seeds = cast("list[int]", seeds)
        if not all(0 <= s <= MAX_SEED for s in seeds):
            raise OptionError(f"{{seeds}} must be ints in [0, {MAX_SEED}] (2**63 - 1)", {"seeds": seeds})
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            # a spread "over seeds" of one seed run twice would be a spread over nothing
            raise OptionError(
                f"{{seeds}} repeats {repeated}: each seed runs once; accepted: distinct seeds",
                {"seeds": seeds},
            )
        object.__setattr__(self, "seeds", tuple(seeds))
        check_positive("epochs", self.epochs, (int,))
        check_positive("batch_size", self.batch_size, (int,))
        check_positive("lr", self.lr)
        decay = self.weight_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < math.inf:
            raise OptionError("{weight_decay} must be a finite number >= 0", {"weight_decay": decay})


def _check_matching(train: FeatureSplit, test: FeatureSplit) -> None:
    """Train and test must have the same encoders, layers and channel widths."""
    layout = lambda s: [[tuple(g.shape[3:]) for g in layers] for layers in s.grids]
    if layout(train) != layout(test):
        raise ValueError(
            f"train and test FeatureSplit grids differ in encoders/layers/channels: "
            f"{layout(train)} vs {layout(test)}"
        )


def fit(
    model: ProbeModel,
    task: ProbeTask,
    split: FeatureSplit,
    targets: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    generator: torch.Generator,
    device: torch.device,
) -> list[float]:
    """Train ``model`` with AdamW and a linear-warm-up cosine schedule; returns the mean loss per epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = len(targets)
    steps_per_epoch = math.ceil(n / batch_size)
    total, warmup = epochs * steps_per_epoch, max(1, epochs * steps_per_epoch // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)),
    )
    history = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        running = 0.0
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            loss = task.loss(model(split.select(batch), targets[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item() * len(batch)
        history.append(running / n)
    return history


@torch.no_grad()
def predict(
    model: ProbeModel, split: FeatureSplit, targets: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The model's outputs on every sample of ``split``, in order (eval mode); a head that reads
    the targets (the VLM probe's questions and options) gets each batch's."""
    model.eval()
    outputs = []
    for start in range(0, len(split), batch_size):
        batch = torch.arange(start, min(start + batch_size, len(split)), device=device)
        outputs.append(model(split.select(batch), targets[batch]))
    return torch.cat(outputs)


@torch.no_grad()
def fused_tokens(
    fusion: nn.Module, split: FeatureSplit, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The main tokens plus the sum of the DeepStack sets of every sample of ``split`` (eval mode)."""
    fusion.eval()
    out = []
    for start in range(0, len(split), batch_size):
        tokens, extras = _contract(fusion).forward_deepstack(
            split.select(torch.arange(start, min(start + batch_size, len(split)), device=device))
        )
        out.append(sum(extras, tokens))
    return torch.cat(out)


def _to_device(split: FeatureSplit, device: torch.device, keep: torch.Tensor) -> FeatureSplit:
    """The samples ``keep`` of ``split`` with grids as float32 on ``device``."""
    return FeatureSplit(
        grids=[
            [g[keep.to(g.device)].to(device=device, dtype=torch.float32) for g in layers]
            for layers in split.grids
        ],
        num_classes=split.num_classes,
    )


def seed_summary(values: Sequence[float]) -> dict:
    """Mean, sample std (0.0 for one value) and the values themselves."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "per_seed": values}


def run_probe(
    task: str | ProbeTask,
    make_head: Callable[[], nn.Module],
    train: FeatureSplit,
    test: FeatureSplit,
    recipe: ProbeRecipe | None = None,
) -> TaskAccuracy:
    """Train and evaluate one probe for each seed.

    For each seed, with the global RNG seeded to it (and restored afterwards): ``make_head()``
    builds a fresh fusion head (a :class:`encoder_fusion.FusionHead`: ``forward(grids) -> (B, N, D)``,
    ``forward_deepstack(grids) -> ((B, N, D), [extra (B, N, D), ...])`` and ``to_grid(tokens) ->
    (B, H, W, D')``), a task head is put on top of it (it sees the main tokens plus the sum of the
    DeepStack extra sets: :class:`ProbeModel`), both train with AdamW on ``train`` and are
    evaluated on ``test``. Samples without a target (label -1, NaN box, mask all ignored) are left
    out of both. Results depend only on the inputs and the seeds.

    Args:
        task: a name of ``TASKS`` (``classification``, ``dense``, ``localization``, ...) or a task
            object (the ``vlm`` probe bound to a strategy's VLM).
        make_head: builds an untrained fusion head for the encoders of the features.
        train, test: the features and targets of the two splits.
        recipe: seeds, epochs, learning rate, batch size, weight decay and device (default
            :class:`ProbeRecipe`).

    Returns:
        The :class:`TaskAccuracy`, with ``item_stats`` for the paired intervals. Layer weights are
        read through ``head.layer_weights()`` after training, when the heads learn them
        (``weighted_ln`` combines): ``extra["layer_weights"]`` ``{encoder: [weight per hooked layer]}``
        is the mean over seeds of each seed's softmax weights.

    Raises:
        ValueError: unknown task; missing or invalid targets; mismatched train/test grids; bad
            seeds, epochs, lr, batch_size or weight_decay; a split without any usable sample.
    """
    if isinstance(task, ProbeTask):
        probe = task
    elif task in TASKS:
        probe = TASKS[task]
    else:
        raise ValueError(f"probe task={task!r} is unknown; accepted: {', '.join(sorted(TASKS))}")
    if not callable(make_head):
        raise ValueError(f"run_probe make_head must be a callable returning a FusionHead, got {make_head!r}")
    probe.check(train, "train")
    probe.check(test, "test")
    _check_matching(train, test)
    recipe = recipe or ProbeRecipe()
    device = torch.device(recipe.device)

    per_seed: list[dict[str, float]] = []
    items: list[torch.Tensor] = []
    losses: list[float | None] = []
    learned: list[dict[str, list[float]]] = []
    prepared: dict[tuple[int, int], tuple] = {}
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    for seed in recipe.seeds:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            scores, item_stats, loss, weights = _train_and_test(
                probe, make_head, train, test, prepared, seed, recipe, device
            )
        per_seed.append(scores)
        items.append(item_stats)
        losses.append(loss)
        learned.append(weights)

    metrics = {name: seed_summary([s[name] for s in per_seed]) for name in per_seed[0]}
    main = metrics.pop(probe.METRIC)
    _, train_targets, _, test_targets = next(iter(prepared.values()))
    return TaskAccuracy(
        task=probe.NAME,
        metric=probe.METRIC,
        **main,
        seeds=list(recipe.seeds),
        extra={
            **metrics,
            "baseline": probe.baseline(train_targets.cpu(), test_targets.cpu(), train.num_classes),
            **({"train_loss": losses} if probe.TRAINS else {}),
            **_layer_weight_summary(learned),
        },
        train_size=len(train_targets),
        test_size=len(test_targets),
        epochs=recipe.epochs,
        lr=float(recipe.lr),
        batch_size=recipe.batch_size,
        weight_decay=float(recipe.weight_decay),
        item_stats=torch.stack(items).to(torch.float64),
    )


def _train_and_test(
    probe: ProbeTask,
    make_head: Callable[[], nn.Module],
    train: FeatureSplit,
    test: FeatureSplit,
    prepared: dict,
    seed: int,
    recipe: ProbeRecipe,
    device: torch.device,
) -> tuple[dict[str, float], torch.Tensor, float | None, dict[str, list[float]]]:
    """One seed: a fresh fusion head and task head, trained, then scored on test. ``prepared``
    caches the splits' targets per fused grid size. Returns the scores, the per-item statistics, the
    last epoch's loss and the trained fusion head's learned layer weights (``{}`` when it learns none)."""
    fusion = make_head()
    if not isinstance(fusion, nn.Module):
        raise ValueError(f"run_probe make_head() must return an nn.Module, got {type(fusion).__name__}")
    fusion = fusion.to(device)
    # one sample through the fusion head tells the fused grid and the task head's input width
    with torch.no_grad():
        fusion.eval()
        tokens = fusion([[g[:1].to(device=device, dtype=torch.float32) for g in ls] for ls in train.grids])
        grid = _contract(fusion).to_grid(tokens)
    grid_hw = (grid.shape[1], grid.shape[2])  # (B, H, W, D')
    width = (grid if probe.INPUT == "grid" else tokens).shape[-1]
    if grid_hw not in prepared:
        prepared[grid_hw] = _prepare(probe, train, test, grid_hw, device)
    train_split, train_targets, test_split, test_targets = prepared[grid_hw]
    head = probe.build_head(width, grid_hw, train.num_classes)
    model = ProbeModel(fusion, head, probe.INPUT).to(device)
    if probe.TRAINS:
        history = fit(
            model,
            probe,
            train_split,
            train_targets,
            epochs=recipe.epochs,
            lr=float(recipe.lr),
            batch_size=recipe.batch_size,
            weight_decay=float(recipe.weight_decay),
            generator=torch.Generator().manual_seed(seed),
            device=device,
        )
    else:  # the head at initialisation, remembering the train split
        history = [None]
        cast(Any, head).remember(fused_tokens(fusion, train_split, recipe.batch_size, device), train_targets)
    outputs = predict(model, test_split, test_targets, recipe.batch_size, device)
    scores = probe.scores(outputs, test_targets, train.num_classes)
    item_stats = probe.item_stats(outputs, test_targets, train.num_classes).cpu()
    return scores, item_stats, history[-1], _learned_weights(fusion)


def _learned_weights(fusion: nn.Module) -> dict[str, list[float]]:
    """``fusion.layer_weights()`` of a trained :class:`encoder_fusion.model.FusionHead`; ``{}`` for a head
    without that method (``make_head`` may build any module with the FusionHead forward contract)."""
    # FusionHead.layer_weights() -> {encoder: weights}; an attribute read by name is typed object
    layer_weights = cast(
        "Callable[[], Mapping[str, list[float]]] | None", getattr(fusion, "layer_weights", None)
    )
    return dict(layer_weights()) if callable(layer_weights) else {}


def _layer_weight_summary(learned: Sequence[dict[str, list[float]]]) -> dict:
    """``{"layer_weights": {encoder: mean over seeds}, "layer_weights_per_seed": {encoder: [per seed]}}``
    from each seed's learned weights; ``{}`` when no seed's head learned any."""
    if not any(learned):
        return {}
    encoders = list(learned[0])
    shapes = [{name: len(weights) for name, weights in seed.items()} for seed in learned]
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError(
            f"run_probe make_head() must build heads with the same learned layer weights for every "
            f"seed; got encoder -> layer counts {shapes}"
        )
    per_seed = {name: [[float(w) for w in seed[name]] for seed in learned] for name in encoders}
    mean = {
        name: [math.fsum(column) / len(column) for column in zip(*seeds)] for name, seeds in per_seed.items()
    }
    return {"layer_weights": mean, "layer_weights_per_seed": per_seed}


def _prepare(probe: ProbeTask, train: FeatureSplit, test: FeatureSplit, grid_hw: tuple[int, int], device):
    """Targets for the fused grid, and both splits reduced to the samples that have one, on ``device``."""
    prepared = []
    for which, split in (("train", train), ("test", test)):
        targets = probe.targets(split, grid_hw)
        keep = probe.valid(targets)
        if not bool(keep.any()):
            raise ValueError(f"the {which} split has no sample with a usable {probe.TARGET} target")
        prepared += [_to_device(split, device, keep), targets[keep].to(device)]
    return tuple(prepared)
