"""Evaluate a trained model from its checkpoint on the test set.

    python -m experiments.evaluate --checkpoint runs/best              # the run's selected epoch
    python -m experiments.evaluate --checkpoint runs/best/checkpoints --step 40
    python -m experiments.evaluate --checkpoint runs/best/checkpoints/40

The configuration (model, data, preprocessing) comes from the checkpoint. Prints the test loss,
the number of test sequences whose logits diverged (see :func:`experiments.steps.diverged_rows`)
and the test figures of :func:`experiments.report.classification_figures` (accuracy, weighted and
macro F1, per-class accuracy, confusion matrix, per-subject accuracy where the subjects are
known) as JSON, and writes them with a confusion-matrix plot to ``evaluation-epoch<N>.json`` and
``evaluation-epoch<N>-confusion_matrix.png`` in the run folder (or ``--output``).

Exit status: 0 success, 2 an unusable run folder or checkpoint, 1 the run's dataset could not be
loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from experiments import cli, report
from experiments.checkpoints import CheckpointError
from experiments.config import ConfigError
from experiments.data import DataError
from experiments.files import write_text_atomically
from experiments.restore import add_checkpoint_arguments, restore_run


def evaluate_checkpoint(
    checkpoint: os.PathLike | str, *, step: int | None = None, data_dir: str | None = None
) -> dict[str, Any]:
    """Restores a model from a checkpoint (see :func:`experiments.restore.restore_run`) and evaluates it once on
    the test set.

    Returns:
        ``{"checkpoint", "epoch", "dataset", "test_loss", "test_diverged", "test"}``,
        ``test_diverged`` being the number of test rows whose logits diverged (see
        :func:`experiments.steps.diverged_rows`; a warning is logged when it is not 0) and
        ``test`` the :func:`~experiments.report.classification_figures` of the test set.
    """
    run = restore_run(checkpoint, step=step, data_dir=data_dir)
    result = run.evaluate_test()
    report.warn_if_diverged(result.diverged, len(run.dataset.test.y), run.epoch)
    return {
        "checkpoint": str(run.checkpoint_dir),
        "epoch": run.epoch,
        "dataset": run.dataset.name,
        "test_loss": result.loss,
        "test_diverged": result.diverged,
        "test": report.classification_figures(
            run.dataset.test.y,
            result.predictions,
            run.dataset.class_names,
            run.dataset.test.subjects,
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = cli.command_parser("experiments.evaluate", __doc__)
    add_checkpoint_arguments(parser, "evaluate")
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="where to write evaluation-epoch<N>.json and the confusion-matrix plot "
        "(default: the run folder)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see the module's doc)."""
    cli.configure_logging()
    args = build_parser().parse_args(argv)
    try:
        evaluation = evaluate_checkpoint(args.checkpoint, step=args.step, data_dir=args.data_dir)
    except (CheckpointError, ConfigError) as err:
        return cli.report_error(err, cli.USAGE)
    except DataError as err:
        return cli.report_error(err, cli.FAILED)
    output = pathlib.Path(args.output or pathlib.Path(evaluation["checkpoint"]).parent.parent)
    output.mkdir(parents=True, exist_ok=True)
    stem = f"evaluation-epoch{evaluation['epoch']}"
    write_text_atomically(output / f"{stem}.json", json.dumps(evaluation, indent=2) + "\n")
    report.plot_confusion_matrix(
        evaluation["test"],
        output / f"{stem}-confusion_matrix.png",
        title=f"{evaluation['dataset']} test set, epoch {evaluation['epoch']}",
    )
    print(json.dumps(evaluation, indent=2))
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
