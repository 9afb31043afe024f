"""Figures of a training run: test metrics, the final JSON report and plots.

Epoch selection, the honest protocol (docs/model.md §5): the epoch with the highest validation accuracy
(the latest of equal ones); without a validation split, the last epoch. The report's test
figures are those of the model of that epoch, evaluated once. The best test accuracy over all
epochs, the paper's (optimistic) protocol, is reported separately and labelled as such.

Plots use matplotlib's Agg renderer (``matplotlib.figure.Figure`` written with ``savefig``), so no
display is needed and pyplot's global state is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import platform
import statistics
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import jax
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from experiments.data import Dataset

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
LEARNING_CURVES_FILE = "learning_curves.png"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"

_VERSIONED_PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "scikit-learn",
    "larnn_jax",
)


def selection_score(metrics: dict[str, Any]) -> float:
    """The number epochs are selected by: the validation accuracy of the epoch's metrics line,
    or 0 for every epoch when there is no validation split (so the last epoch wins)."""
    value = metrics.get("val_accuracy")
    return 0.0 if value is None else float(value)


def select_epoch(history: Sequence[dict[str, Any]]) -> int:
    """The selected epoch of a metrics history (a list of per-epoch metrics lines).

    The highest :func:`selection_score`, the latest among equals (as the checkpoints' retention
    policy, which therefore always keeps the selected epoch's checkpoint).
    """
    if not history:
        raise ValueError("empty history: no epoch to select")
    best = max(range(len(history)), key=lambda i: (selection_score(history[i]), i))
    return int(history[best]["epoch"])


def warn_if_diverged(diverged: int | None, rows: int, epoch: int) -> None:
    """Logs a warning when some of the ``rows`` test sequences diverged with the model of
    ``epoch`` (``diverged`` None: not counted, as in runs recorded before it was)."""
    if diverged:
        log.warning(
            "%d of %d test sequences diverged with the model of epoch %d: their logits are huge "
            "or non-finite because the evaluation-mode recurrence (batch norm with running "
            "averages) grows exponentially over time for them, not because the model is "
            "confident; their predictions are unreliable and their losses dominate the test loss",
            diverged,
            rows,
            epoch,
        )


def classification_figures(
    labels: np.ndarray,
    predictions: np.ndarray,
    class_names: Sequence[str],
    subjects: np.ndarray | None = None,
) -> dict[str, Any]:
    """Accuracy, weighted and macro F1, per-class accuracy, the confusion matrix and, when the
    rows' subjects are known, per-subject accuracy.

    Args:
        labels: true classes ``(N,)``, in ``0 .. len(class_names) - 1``.
        predictions: predicted classes ``(N,)``.
        class_names: the name of each class, index = class.
        subjects: the subject id of each row ``(N,)``, or None when unknown.

    Returns:
        A JSON-serialisable dict. ``per_class_accuracy[name]`` is the fraction of that class's
        rows predicted correctly (its recall; None when the class has no row);
        ``confusion_matrix[i][j]`` counts rows of class ``i`` predicted as ``j``;
        ``per_subject_accuracy[str(id)]`` (only with ``subjects``) the fraction of that
        subject's rows predicted correctly, in increasing order of id.
    """
    classes = list(range(len(class_names)))
    matrix = confusion_matrix(labels, predictions, labels=classes)
    support = matrix.sum(axis=1)
    figures = {
        "examples": len(labels),
        "accuracy": float(accuracy_score(labels, predictions)),
        "weighted_f1": float(
            f1_score(labels, predictions, labels=classes, average="weighted", zero_division=0)
        ),
        "macro_f1": float(
            f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)
        ),
        "per_class_accuracy": {
            name: (float(matrix[i, i] / support[i]) if support[i] else None)
            for i, name in enumerate(class_names)
        },
        "class_names": list(class_names),
        "confusion_matrix": matrix.tolist(),
    }
    if subjects is not None:
        figures["per_subject_accuracy"] = per_subject_accuracy(labels, predictions, subjects)
    return figures


def per_subject_accuracy(
    labels: np.ndarray, predictions: np.ndarray, subjects: np.ndarray
) -> dict[str, float]:
    """``{str(id): accuracy}`` over the rows of each subject, in increasing order of id; all
    three arguments ``(N,)``."""
    correct = np.asarray(labels) == np.asarray(predictions)
    return {
        str(subject): float(correct[subjects == subject].mean()) for subject in np.unique(subjects)
    }


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, JAX devices and package versions of this process."""
    versions: dict[str, str | None] = {}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(device) for device in jax.devices()],
        "versions": versions,
    }


def build(
    *,
    run: os.PathLike | str,
    config: dict[str, Any],
    dataset: Dataset,
    history: Sequence[dict[str, Any]],
    test_predictions: np.ndarray,
    parameter_count: int,
    wall_seconds: float,
) -> dict[str, Any]:
    """The final report of a run.

    Args:
        run: the run folder.
        config: the run's configuration (TrainConfig fields).
        dataset: the data the run was trained and evaluated on.
        history: the metrics line of every epoch, in order.
        test_predictions: predicted test classes ``(N_test,)`` of the selected epoch's model.
        parameter_count: number of trained parameters.
        wall_seconds: wall time of the training call that finishes the run (only the last
            session's, if it was resumed; ``training_seconds`` adds up every epoch). A finished
            run resumed again keeps its report.

    Returns:
        A JSON-serialisable dict; see the keys below. ``test_diverged`` is the number of test
        sequences that diverged at the selected epoch (None for histories recorded before it was
        counted); a warning is logged when it is not 0.
    """
    selected = select_epoch(history)
    at_selected = next(line for line in history if line["epoch"] == selected)
    test_diverged = at_selected.get("test_diverged")
    warn_if_diverged(test_diverged, len(dataset.test.y), selected)
    best_test = max(history, key=lambda line: line["test_accuracy"])
    epoch_seconds = [line["epoch_seconds"] for line in history]
    if dataset.val is not None:
        criterion = "highest validation accuracy (the latest of equal epochs)"
    else:
        criterion = "last epoch: there is no validation split, so nothing to select on"
    return {
        "run": str(run),
        "dataset": dataset.name,
        "model": config["model"],
        "epochs": len(history),
        "selection": {
            "epoch": selected,
            "criterion": criterion,
            "val_accuracy": at_selected["val_accuracy"],
            "val_loss": at_selected["val_loss"],
        },
        "test": classification_figures(
            dataset.test.y, test_predictions, dataset.class_names, dataset.test.subjects
        ),
        "test_diverged": test_diverged,
        "optimistic_protocol_best_test_accuracy": best_test["test_accuracy"],
        "optimistic_protocol_best_test_epoch": best_test["epoch"],
        "optimistic_protocol_note": (
            "best test accuracy over all epochs, as the paper reports it: selecting on the test "
            "set overestimates the accuracy; the honest figure is test.accuracy"
        ),
        "parameter_count": int(parameter_count),
        "wall_seconds": wall_seconds,
        "training_seconds": float(sum(epoch_seconds)),
        "seconds_per_epoch": {
            "mean": statistics.fmean(epoch_seconds),
            "median": statistics.median(epoch_seconds),
            "note": "training and evaluation, without checkpointing; the first epoch includes "
            "compilation",
        },
        "machine": machine_info(),
        "config": config,
    }


def write(
    out: os.PathLike | str, report: dict[str, Any], history: Sequence[dict[str, Any]]
) -> None:
    """Writes ``report.json``, ``learning_curves.png`` and ``confusion_matrix.png`` into ``out``."""
    out = pathlib.Path(out)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    plot_learning_curves(history, out / LEARNING_CURVES_FILE, report["selection"]["epoch"])
    plot_confusion_matrix(
        report["test"],
        out / CONFUSION_MATRIX_FILE,
        title=f"{report['dataset']} test set, epoch {report['selection']['epoch']}",
    )


def plot_learning_curves(
    history: Sequence[dict[str, Any]], path: os.PathLike | str, selected_epoch: int
) -> None:
    """Loss and accuracy per epoch for the train, validation and test splits, as a PNG.

    Training figures are averages over the epoch's steps (training mode); validation and test
    figures are measured after the epoch (evaluation mode). A dashed line marks the selected
    epoch. Losses are on a logarithmic axis (diverged rows can make evaluation losses huge);
    missing values (no validation split, a loss that was not finite) leave gaps.
    """
    epochs = [line["epoch"] for line in history]
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    for axes, quantity in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for split, label in (("train", "train"), ("val", "validation"), ("test", "test")):
            values = [line[f"{split}_{quantity}"] for line in history]
            if any(value is not None for value in values):
                values = [np.nan if value is None else value for value in values]
                axes.plot(epochs, values, label=label, marker="." if len(epochs) < 30 else None)
        if quantity == "loss":
            axes.set_yscale("log")
        axes.axvline(selected_epoch, color="grey", linestyle="--", linewidth=1, label="selected")
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("cross-entropy" if quantity == "loss" else "accuracy")
        axes.set_title(quantity)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(path, dpi=120)


def plot_confusion_matrix(figures: dict[str, Any], path: os.PathLike | str, title: str) -> None:
    """The confusion matrix of :func:`classification_figures` output as a PNG.

    Cells show counts; colours show the fraction of each true class (rows sum to 1).
    """
    matrix = np.asarray(figures["confusion_matrix"])
    names = figures["class_names"]
    fractions = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.7 * len(names)
    figure = Figure(figsize=(size + 1.5, size), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="fraction of the true class")
    for (i, j), count in np.ndenumerate(matrix):
        colour = "white" if fractions[i, j] > 0.5 else "black"
        axes.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=9)
    ticks = range(len(names))
    axes.set_xticks(ticks, names, rotation=45, ha="right")
    axes.set_yticks(ticks, names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(
        f"{title}\naccuracy {figures['accuracy']:.4f}, macro F1 {figures['macro_f1']:.4f}"
    )
    figure.savefig(path, dpi=120)
