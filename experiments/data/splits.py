"""A dataset by name, with a validation split and standardised inputs: :func:`load_dataset`.

The validation rows are whole training subjects when subject ids are known, else a random
fraction of the training rows; the standardisation is fitted on the training part (after the
validation rows are removed) and applied to every split.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from experiments.data.dataset import Dataset, DataSettingsError, Split
from experiments.data.npz import load_npz
from experiments.data.uci_har import load_uci_har


def _select(split: Split, mask: np.ndarray) -> Split:
    return Split(
        split.x[mask], split.y[mask], None if split.subjects is None else split.subjects[mask]
    )


def _split_by_subject(split: Split, count: int, rng: np.random.Generator) -> tuple[Split, Split]:
    """Hold out ``count`` whole subjects, drawn by ``rng``: (rest, held out)."""
    if split.subjects is None:
        raise DataSettingsError(
            f"validation_subjects={count} needs subject ids, which the training data lacks"
        )
    subjects = np.unique(split.subjects)
    if count >= len(subjects):
        raise DataSettingsError(
            f"validation_subjects={count}, but the training data has only {len(subjects)} subjects"
        )
    held_out = rng.choice(subjects, size=count, replace=False)
    mask = np.isin(split.subjects, held_out)
    return _select(split, ~mask), _select(split, mask)


def _split_by_fraction(
    split: Split, fraction: float, rng: np.random.Generator
) -> tuple[Split, Split]:
    """Hold out ``round(fraction * N)`` rows drawn by ``rng``, order kept: (rest, held out)."""
    rows = len(split.y)
    count = round(fraction * rows)
    if not 0 < count < rows:
        left = "no training rows" if count else "no validation rows"
        raise DataSettingsError(
            f"validation_fraction={fraction} holds out {count} of the {rows} training rows, "
            f"leaving {left}"
        )
    mask = np.zeros(rows, dtype=bool)
    mask[rng.permutation(rows)[:count]] = True
    return _select(split, ~mask), _select(split, mask)


def check_dataset_spec(spec: str) -> None:
    """Raises :class:`DataSettingsError` unless ``spec`` names a dataset: ``"uci_har"`` or
    ``"npz:PATH"`` (the file itself is checked when it is loaded)."""
    if spec != "uci_har" and not (spec.startswith("npz:") and len(spec) > len("npz:")):
        raise DataSettingsError(f"unknown dataset spec {spec!r}; expected 'uci_har' or 'npz:PATH'")


def load_dataset(
    spec: str = "uci_har",
    data_dir: str | os.PathLike | None = None,
    *,
    validation_subjects: int = 4,
    validation_fraction: float = 0.2,
    standardize: bool = True,
    seed: int = 0,
) -> Dataset:
    """Load a dataset, split off validation data and standardise it.

    Args:
        spec: ``"uci_har"`` (see :func:`load_uci_har`; downloaded if absent) or ``"npz:PATH"``
            (see the module docstring; PATH relative to the working directory).
        data_dir: for ``"uci_har"``, the folder that contains ``UCI HAR Dataset/``.
        validation_subjects: when the training rows have subject ids, the number of whole
            training subjects held out for validation, drawn by ``np.random.default_rng(seed)``;
            0 for no validation split. Test subjects are never used.
        validation_fraction: when there are no subject ids, the fraction of training rows held
            out for validation, drawn by ``np.random.default_rng(seed)``; 0 for no validation
            split.
        standardize: subtract the per-channel mean and divide by the per-channel standard
            deviation, both over the training rows (after the validation rows are removed) and
            all time steps, from every split.
        seed: seed of the validation draw.

    An ``.npz`` file's own ``X_val``/``y_val`` are used as they are, without further split.

    Returns:
        The :class:`Dataset`.
    """
    check_dataset_spec(spec)
    if validation_subjects < 0:
        raise DataSettingsError(f"validation_subjects must be >= 0, got {validation_subjects}")
    if not 0 <= validation_fraction < 1:
        raise DataSettingsError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if spec == "uci_har":
        train, test, class_names = load_uci_har(data_dir)
        val, name = None, "uci_har"
    else:
        path = pathlib.Path(spec.removeprefix("npz:")).expanduser()
        train, val, test, class_names = load_npz(path)
        name = path.stem

    rng = np.random.default_rng(seed)
    if val is None and train.subjects is not None and validation_subjects > 0:
        train, val = _split_by_subject(train, validation_subjects, rng)
    elif val is None and train.subjects is None and validation_fraction > 0:
        train, val = _split_by_fraction(train, validation_fraction, rng)

    mean = std = None
    if standardize:
        mean = train.x.mean(axis=(0, 1), dtype=np.float64).astype(np.float32)
        std = train.x.std(axis=(0, 1), dtype=np.float64).astype(np.float32)
        std[std == 0] = 1.0

        def scale(split: Split) -> Split:
            return dataclasses.replace(split, x=(split.x - mean) / std)

        train, test = scale(train), scale(test)
        val = None if val is None else scale(val)
    return Dataset(
        train=train,
        val=val,
        test=test,
        num_classes=len(class_names),
        class_names=class_names,
        name=name,
        channel_mean=mean,
        channel_std=std,
    )
