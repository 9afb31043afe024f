"""Evaluate an ensemble of trained runs (typically one variant's seeds) on the test set.

    python -m experiments.ensemble --output larnn-seeds.json runs/larnn-seed0 runs/larnn-seed1 runs/larnn-seed2

Each run is restored at its own honest epoch (the epoch selected on validation; the final epoch
for a run trained without validation subjects) and classifies the test set through its own
preprocessing; the ensemble's prediction for a sequence is the class of highest mean probability
over the runs. Writes, as JSON, the members (run folder name, epoch, test accuracy, diverged test
sequences) and the ensemble's test figures (:func:`experiments.report.classification_figures`).

The runs must share the test set (the same dataset, classes and labels); a run with a diverged
test sequence (non-finite logits) cannot be averaged. An existing --output is replaced only with
--overwrite.

Exit status: 0 success, 2 a usage error (an unusable run folder or checkpoint, runs that do not
share a test set, a run with diverged test sequences, an --output that cannot be written), 1 a
run's dataset could not be loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments import cli, report
from experiments.checkpoints import CheckpointError
from experiments.config import ConfigError
from experiments.data import DataError, Dataset
from experiments.files import OutputPathError, check_output_file, write_text_atomically
from experiments.restore import restore_run


class EnsembleError(ValueError):
    """Runs that cannot be averaged: no run, different test sets, or diverged test sequences."""


def evaluate_ensemble(
    runs: Sequence[os.PathLike | str], *, data_dir: str | None = None
) -> dict[str, Any]:
    """Evaluates each run on the test set at its honest epoch and averages the runs' class
    probabilities ``(N, K)``.

    Args:
        runs: run folders (see :func:`experiments.restore.restore_run`).
        data_dir: where the runs' dataset lives (default: each run's).

    Returns:
        ``{"dataset", "members", "test"}``: ``members`` one ``{"run", "epoch", "test_accuracy",
        "test_diverged"}`` per run (``run`` the name of its folder), ``test`` the
        :func:`~experiments.report.classification_figures` of the ensemble's predictions.

    Raises:
        EnsembleError: no run, runs whose test sets differ, or a run with diverged test
            sequences.
        CheckpointError, ConfigError, experiments.data.DataError: as for ``restore_run``.
    """
    if not runs:
        raise EnsembleError("no run to average")
    reference, member, total = _evaluate_member(runs[0], data_dir)
    members = [member]
    for path in runs[1:]:
        dataset, member, probabilities = _evaluate_member(path, data_dir)
        if (dataset.name, dataset.class_names) != (reference.name, reference.class_names) or (
            not np.array_equal(dataset.test.y, reference.test.y)
        ):
            raise EnsembleError(
                f"{path}: its test set ({dataset.name}, {len(dataset.test.y)} sequences) is not "
                f"that of {runs[0]} ({reference.name}, {len(reference.test.y)} sequences)"
            )
        members.append(member)
        total = total + probabilities
    return {
        "dataset": reference.name,
        "members": members,
        "test": report.classification_figures(
            reference.test.y, total.argmax(axis=-1), reference.class_names, reference.test.subjects
        ),
    }


def _evaluate_member(
    path: os.PathLike | str, data_dir: str | None
) -> tuple[Dataset, dict[str, Any], np.ndarray]:
    """One run's dataset, its member entry and its test probabilities ``(N, K)``."""
    run = restore_run(path, data_dir=data_dir)
    result = run.evaluate_test()
    if result.diverged:
        raise EnsembleError(
            f"{path}: {result.diverged} test sequences diverged at epoch {run.epoch}; their "
            "probabilities cannot be averaged"
        )
    member = {
        "run": run.checkpoint_dir.parent.parent.name,
        "epoch": run.epoch,
        "test_accuracy": result.accuracy,
        "test_diverged": result.diverged,
    }
    return run.dataset, member, result.probabilities


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = cli.command_parser("experiments.ensemble", __doc__, epilog_from_doc=True)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a run folder (OUT)")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder that holds 'UCI HAR Dataset/' (default: the runs', else $LARNN_DATA_DIR)",
    )
    cli.add_output_arguments(parser, "the JSON file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, 1 or 2: see the module's doc)."""
    cli.configure_logging()
    args = build_parser().parse_args(argv)
    try:
        output = check_output_file(args.output, overwrite=args.overwrite)
    except OutputPathError as err:
        return cli.report_error(f"--output {err}", cli.USAGE)
    try:
        ensemble = evaluate_ensemble(args.runs, data_dir=args.data_dir)
    except (CheckpointError, ConfigError, EnsembleError) as err:
        return cli.report_error(err, cli.USAGE)
    except DataError as err:
        return cli.report_error(err, cli.FAILED)
    text = json.dumps(ensemble, indent=2) + "\n"
    write_text_atomically(output, text)
    print(text, end="")
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
