"""Datasets for sequence classification: UCI HAR and a generic ``.npz`` format.

Shapes: ``N`` windows (rows), ``T`` time steps, ``C`` channels. Inputs are ``(N, T, C)`` float32,
labels ``(N,)`` int32 in ``0 .. num_classes - 1``, subject ids ``(N,)`` int32.

* :func:`load_dataset` (``splits.py``): a dataset by name (``"uci_har"`` or ``"npz:PATH"``), with
  a validation split and per-channel standardisation fitted on the training part;
* :func:`load_uci_har` (``uci_har.py``): the raw UCI HAR splits, parsed from the official text
  files and cached; ``download.py``: where those files live, their SHA-256 table and their
  download;
* ``npz.py``: users' own data, a ``.npz`` file with ``X_train (N, T, C)``, ``y_train (N,)``,
  ``X_test``, ``y_test``, optionally ``X_val``, ``y_val``, ``subjects_train (N,)`` and
  ``class_names (K,)``;
* ``dataset.py``: :class:`Split`, :class:`Dataset`, :class:`DataError`, raised for every
  problem with the data itself, and :class:`DataSettingsError`, for settings that do not fit the
  data (an unknown spec, a validation split that leaves a part empty).

Command line: ``python -m experiments.data [--data-dir DIR] [--dataset SPEC]`` prints a summary.
"""

from experiments.data.dataset import DataError, Dataset, DataSettingsError, Split
from experiments.data.download import (
    UCI_HAR_CHANNELS,
    UCI_HAR_FOLDER,
    UCI_HAR_SHA256,
    UCI_HAR_URL,
    resolve_data_dir,
)
from experiments.data.splits import check_dataset_spec, load_dataset
from experiments.data.uci_har import load_uci_har

__all__ = [
    "UCI_HAR_CHANNELS",
    "UCI_HAR_FOLDER",
    "UCI_HAR_SHA256",
    "UCI_HAR_URL",
    "DataError",
    "DataSettingsError",
    "Dataset",
    "Split",
    "check_dataset_spec",
    "load_dataset",
    "load_uci_har",
    "resolve_data_dir",
]
