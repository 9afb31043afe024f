"""Load a dataset (downloading UCI HAR if absent) and print a summary of its splits.

    python -m experiments.data [--data-dir DIR] [--dataset SPEC]

Prints the shapes, the class counts and the subjects of every split, and the standardisation.
Exit status: 0 success, 1 the data is missing or malformed, 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from experiments import cli
from experiments.data.dataset import DataError, Dataset, DataSettingsError
from experiments.data.download import resolve_data_dir, user_cache_dir
from experiments.data.splits import load_dataset


def summary(dataset: Dataset) -> str:
    """A human-readable description: shapes, class counts and subjects of every split."""
    _, steps, channels = dataset.train.x.shape
    lines = [
        f"dataset {dataset.name}: {dataset.num_classes} classes, {steps} steps x "
        f"{channels} channels"
    ]
    for label, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)):
        if split is None:
            lines.append(f"{label:>5}: none")
            continue
        counts = np.bincount(split.y, minlength=dataset.num_classes)
        lines.append(f"{label:>5}: x {split.x.shape}, y {split.y.shape}")
        lines.append(
            "       classes: "
            + ", ".join(f"{n} {c}" for n, c in zip(dataset.class_names, counts, strict=True))
        )
        if split.subjects is not None:
            subjects = np.unique(split.subjects)
            lines.append(f"       {len(subjects)} subjects: {' '.join(map(str, subjects))}")
    if dataset.channel_mean is not None:
        with np.printoptions(precision=4, suppress=True):
            lines.append(f"standardised with train mean {dataset.channel_mean}")
            lines.append(f"                      and std {dataset.channel_std}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = cli.command_parser("experiments.data", __doc__)
    parser.add_argument(
        "--dataset",
        "--spec",
        default="uci_har",
        help="'uci_har' (default) or 'npz:PATH', as in experiments.train (--spec: the old name)",
    )
    parser.add_argument(
        "--data-dir",
        help="folder that contains 'UCI HAR Dataset/' (default: $LARNN_DATA_DIR, else "
        f"{user_cache_dir()})",
    )
    parser.add_argument("--validation-subjects", type=int, default=4)
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: load a dataset and print its summary; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        dataset = load_dataset(
            args.dataset,
            args.data_dir,
            validation_subjects=args.validation_subjects,
            validation_fraction=args.validation_fraction,
            seed=args.seed,
        )
    except DataError as exc:
        return cli.report_error(exc, cli.FAILED)
    except DataSettingsError as exc:  # an unknown spec, a validation split that leaves nothing
        return cli.report_error(exc, cli.USAGE)
    if args.dataset == "uci_har":
        print(f"data dir: {resolve_data_dir(args.data_dir)}")
    print(summary(dataset))
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
