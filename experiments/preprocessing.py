"""What a trained model expects of its inputs, saved in the run folder: ``preprocessing.json``.

The training standardises every channel with the mean and standard deviation of its training
rows (:func:`experiments.data.load_dataset`); a model must see new data through the same
transformation. :func:`experiments.train.train` writes, next to ``config.json``::

    {
      "dataset": "uci_har",
      "steps": 128,                      the length T of the training sequences
      "channels": 9,                     C
      "standardize": true,
      "channel_mean": [...], "channel_std": [...],      C numbers each (null without standardize)
      "class_names": ["WALKING", ...]    the name of each class, index = label
    }

Runs saved before this file existed have none; :func:`load_preprocessing` then recomputes it from
the run's dataset, as the training did, and says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from experiments.data import Dataset
from larnn_jax.inference import standardize

log = logging.getLogger(__name__)

PREPROCESSING_FILE = "preprocessing.json"


class PreprocessingError(ValueError):
    """A ``preprocessing.json`` that cannot be read or does not describe a run's inputs."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The inputs a trained model expects and how raw inputs are transformed for it.

    Attributes:
        dataset: the name of the training dataset (``"uci_har"``, or an ``.npz`` file's stem).
        steps: ``T``, the length of the training sequences (the window a stream classifies).
        channels: ``C``, the number of input features per time step.
        channel_mean: ``(C,)`` float32 subtracted from every input, or None (not standardised).
        channel_std: ``(C,)`` float32 that every input is divided by, or None.
        class_names: the name of each class, index = label.
    """

    dataset: str
    steps: int
    channels: int
    channel_mean: np.ndarray | None
    channel_std: np.ndarray | None
    class_names: tuple[str, ...]

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> Preprocessing:
        """The preprocessing the training applied to ``dataset`` (as loaded for training)."""
        _, steps, channels = dataset.train.x.shape
        return cls(
            dataset=dataset.name,
            steps=int(steps),
            channels=int(channels),
            channel_mean=dataset.channel_mean,
            channel_std=dataset.channel_std,
            class_names=tuple(dataset.class_names),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``preprocessing.json``."""

        def numbers(array: np.ndarray | None) -> list[float] | None:
            # float32 → Python float is exact, and JSON keeps the shortest repr of that float.
            return None if array is None else [float(value) for value in array]

        return {
            "dataset": self.dataset,
            "steps": self.steps,
            "channels": self.channels,
            "standardize": self.channel_mean is not None,
            "channel_mean": numbers(self.channel_mean),
            "channel_std": numbers(self.channel_std),
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> Preprocessing:
        """Reads :meth:`to_dict`'s object; ``where`` names its file in errors.

        Raises:
            PreprocessingError: a key is missing or a value has the wrong form.
        """
        try:
            channels = int(values["channels"])
            standardize = bool(values["standardize"])
            mean = std = None
            if standardize:
                mean = np.asarray(values["channel_mean"], np.float32)
                std = np.asarray(values["channel_std"], np.float32)
                if mean.shape != (channels,) or std.shape != (channels,):
                    raise PreprocessingError(
                        f"{where}: channel_mean and channel_std must hold {channels} numbers each"
                    )
            return cls(
                dataset=str(values["dataset"]),
                steps=int(values["steps"]),
                channels=channels,
                channel_mean=mean,
                channel_std=std,
                class_names=tuple(str(name) for name in values["class_names"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, PreprocessingError):
                raise
            raise PreprocessingError(f"{where}: not a valid preprocessing file ({err!r})") from err

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Raw inputs ``(..., C)`` → what the model reads: standardised with the training's
        statistics, float32.

        Raises:
            InputRangeError: a value that is not a finite float32, or that the standardisation
                takes beyond float32 (a huge value divided by a standard deviation below 1):
                the model would give NaN probabilities for its sequence.
        """
        return standardize(x, self.channel_mean, self.channel_std)


def load_preprocessing(run: pathlib.Path, recompute: Callable[[], Dataset]) -> Preprocessing:
    """The preprocessing of the run in folder ``run``: its ``preprocessing.json``, else (a run
    saved before that file existed) the one of ``recompute()``, the run's dataset loaded as the
    training loaded it, with a log line that says so.

    Raises:
        PreprocessingError: the file exists but cannot be read.
        experiments.data.DataError: there is no file and the dataset cannot be loaded.
    """
    path = run / PREPROCESSING_FILE
    if path.is_file():
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise PreprocessingError(f"{path}: cannot read it ({err})") from err
        if not isinstance(values, dict):
            raise PreprocessingError(f"{path}: not a JSON object")
        return Preprocessing.from_dict(values, str(path))
    log.warning(
        "%s has no %s (the run was saved before runs recorded it): recomputing the "
        "standardisation and class names from the run's dataset, as its training did",
        run,
        PREPROCESSING_FILE,
    )
    return Preprocessing.from_dataset(recompute())
