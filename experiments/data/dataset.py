"""What every loader of :mod:`experiments.data` returns: :class:`Split`, :class:`Dataset`, and
:class:`DataError` for every problem with the data itself.

Shapes: ``N`` rows (sequences), ``T`` time steps, ``C`` channels.
"""

from __future__ import annotations

import dataclasses

import numpy as np


class DataError(ValueError):
    """The data is missing, corrupt or malformed; the message names the file and what is wrong."""


class DataSettingsError(ValueError):
    """Settings that do not fit the data: an unknown dataset spec, or a validation split that
    would leave the training or the validation part empty. A usage error, not a problem of the
    data itself."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One part of a dataset.

    Attributes:
        x: inputs, ``(N, T, C)`` float32.
        y: labels, ``(N,)`` int32 in ``0 .. num_classes - 1``.
        subjects: subject id of each row, ``(N,)`` int32, or None when unknown.
    """

    x: np.ndarray
    y: np.ndarray
    subjects: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset ready for training.

    Attributes:
        train: training rows (without the validation rows).
        val: validation rows, or None when no validation split was made.
        test: test rows.
        num_classes: number of classes; labels are ``0 .. num_classes - 1``.
        class_names: ``num_classes`` names, index = label.
        name: ``"uci_har"``, or the file stem for ``npz:PATH``.
        channel_mean: per-channel mean ``(C,)`` float32 subtracted from every split, or None when
            the inputs are not standardised.
        channel_std: per-channel standard deviation ``(C,)`` float32 that every split was divided
            by (1 for a constant channel), or None when the inputs are not standardised.
    """

    train: Split
    val: Split | None
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    name: str
    channel_mean: np.ndarray | None
    channel_std: np.ndarray | None
