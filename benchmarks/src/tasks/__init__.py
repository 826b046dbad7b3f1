"""Accuracy probes on cached encoder features: classification, dense segmentation, localization,
k-NN on the mean token and token correspondence under a known warp (no training, no labels for the
latter), and the stage-1 VLM probe (the fusion head trained against a
frozen language model).

``run_probe(task, make_head, train, test, ...)`` trains the fusion head plus a small task head per
seed and returns the test metric's mean and std; ``TASKS`` lists the registered tasks.
"""

from encoder_fusion.benchmarks.tasks import classification, correspondence, dense, knn, localization, vlm
from encoder_fusion.benchmarks.tasks.base import TASKS, FeatureSplit, ProbeTask, register_task
from encoder_fusion.benchmarks.tasks.probe import ProbeRecipe, run_probe

__all__ = [
    "TASKS",
    "FeatureSplit",
    "ProbeRecipe",
    "ProbeTask",
    "classification",
    "correspondence",
    "dense",
    "knn",
    "localization",
    "register_task",
    "run_probe",
    "vlm",
]
