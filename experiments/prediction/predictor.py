"""A trained run's model as an object: :class:`Predictor` classifies raw sequences, and
:class:`StreamPredictor` a stream of samples fed one time step at a time.

The model is the run's selected epoch (or a given one), and every input goes through the run's
own preprocessing: the channel standardisation fitted on its training rows, read from the run's
``preprocessing.json`` (:mod:`experiments.preprocessing`).
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from experiments.config import TrainConfig, load_config_dataset
from experiments.preprocessing import Preprocessing, load_preprocessing
from experiments.restore import open_checkpoint
from experiments.steps import model_variables
from larnn_jax import exported
from larnn_jax.inference import StepFunction, WindowStream, predict_in_batches
from larnn_jax.models import SequenceClassifier
from larnn_jax.typing import PyTree


class Predictor:
    """A trained run's model, ready to classify raw inputs.

    Example::

        predictor = Predictor.from_run("runs/best")
        probabilities = predictor.predict(x)          # x: (N, T, C) raw → (N, K)
        names = [predictor.class_names[k] for k in probabilities.argmax(-1)]

        stream = predictor.stream(stride=32)
        for sample in sensor:                         # (C,) raw values per time step
            prediction = stream.push(sample)          # a Prediction every 32 samples, else None

    Attributes:
        model: the classifier.
        variables: its Flax variables (``params``, ``batch_stats``).
        preprocessing: the run's :class:`~experiments.preprocessing.Preprocessing`.
        config: the run's configuration.
        epoch: the epoch whose checkpoint the model comes from.
        checkpoint_dir: that checkpoint's folder.
    """

    def __init__(
        self,
        model: SequenceClassifier,
        variables: PyTree,
        preprocessing: Preprocessing,
        config: TrainConfig,
        epoch: int,
        checkpoint_dir: pathlib.Path,
    ):
        self.model = model
        self.variables = variables
        self.preprocessing = preprocessing
        self.config = config
        self.epoch = epoch
        self.checkpoint_dir = checkpoint_dir

        def probabilities(variables: PyTree, x: jax.Array, lengths: jax.Array | None) -> jax.Array:
            logits = cast(
                jax.Array, model.apply(variables, x, deterministic=True, seq_lengths=lengths)
            )
            return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

        self._probabilities = jax.jit(probabilities)

    @classmethod
    def from_run(
        cls,
        run: os.PathLike | str,
        *,
        step: int | None = None,
        data_dir: str | None = None,
    ) -> Predictor:
        """The model of a run folder (or its ``checkpoints`` folder, or one step folder).

        Args:
            run: the run.
            step: the epoch whose checkpoint to use (default: the run's selected epoch, see
                :func:`experiments.restore.open_checkpoint`).
            data_dir: where the run's dataset lives, for runs saved without
                ``preprocessing.json`` (their standardisation is recomputed from it).

        Raises:
            CheckpointError: no usable checkpoint, or the requested step is absent or bad.
            PreprocessingError: an unreadable ``preprocessing.json``.
            experiments.data.DataError: no ``preprocessing.json`` and no dataset to recompute it.
        """
        with open_checkpoint(run, step=step, data_dir=data_dir) as opened:
            preprocessing = load_preprocessing(
                opened.run_dir, lambda: load_config_dataset(opened.config)
            )
            sample = np.zeros((1, preprocessing.steps, preprocessing.channels), np.float32)
            model, state = opened.restore_model(len(preprocessing.class_names), sample)
            return cls(
                model,
                model_variables(state),
                preprocessing,
                opened.config,
                opened.step,
                opened.step_dir,
            )

    @property
    def origin(self) -> dict[str, Any]:
        """Where the model comes from, for summaries: its checkpoint and epoch."""
        return {"checkpoint": str(self.checkpoint_dir), "epoch": self.epoch}

    @property
    def window_length(self) -> int:
        """``T``: the length of the training sequences, the window a stream classifies."""
        return self.preprocessing.steps

    @property
    def channels(self) -> int:
        """``C``: the values per time step."""
        return self.preprocessing.channels

    @property
    def class_names(self) -> tuple[str, ...]:
        """The name of each class, index = class."""
        return self.preprocessing.class_names

    def predict(
        self,
        x: np.ndarray,
        lengths: np.ndarray | None = None,
        *,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Class probabilities ``(N, K)`` float32 of raw sequences ``x`` ``(N, T', C)``.

        Args:
            x: sequences as the sensor gives them: the run's standardisation is applied here.
            lengths: ``(N,)`` valid steps of each sequence (default: all ``T'``).
            batch_size: sequences per call of the model (default: the run's batch size).

        Raises:
            larnn_jax.inference.InputRangeError: a value that the model cannot read, or a
                sequence whose output is NaN or infinite (its largest value named).
        """
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[-1] != self.channels:
            raise ValueError(
                f"expected sequences of shape (N, T, {self.channels}), got shape {x.shape}"
            )
        return predict_in_batches(
            lambda batch, lengths: self._probabilities(self.variables, batch, lengths),
            self.preprocessing.apply(x),
            lengths,
            batch_size or self.config.batch_size,
            len(self.class_names),
            raw=x,
        )

    def stream(self, stride: int) -> StreamPredictor:
        """A :class:`StreamPredictor` that classifies the last ``T`` samples every ``stride``."""
        return StreamPredictor(self, stride)


class StreamPredictor(WindowStream):
    """A run's model on a stream of samples, fed one time step at a time
    (:class:`larnn_jax.inference.WindowStream` over :meth:`SequenceClassifier.step`).

    After every ``stride`` samples (and at least ``T``), a prediction of the last ``T`` samples:
    the windows :func:`~experiments.prediction.inputs.sliding_windows` cuts from the whole
    series, with the same probabilities as :meth:`Predictor.predict` on them, to float rounding.

    Attributes:
        predictor: the run's model.
        stride, slots, samples, latencies: see :class:`~larnn_jax.inference.WindowStream`.
    """

    def __init__(self, predictor: Predictor, stride: int):
        self.predictor = predictor
        model, variables = predictor.model, predictor.variables
        super().__init__(
            cast(StepFunction, functools.partial(model.apply, variables, method="step")),
            lambda slots: model.initialize_carries((slots,)),
            window_length=predictor.window_length,
            stride=stride,
            standardize=predictor.preprocessing.apply,
            channels=predictor.channels,
        )


class ExportedPredictor:
    """An exported model (:mod:`larnn_jax.exported`) where the command line takes a
    :class:`Predictor`: the same predictions, streams and input checks, without the run.

    Attributes:
        model: the :class:`larnn_jax.exported.ExportedClassifier`.
        preprocessing: its standardisation, window length and class names, as a
            :class:`~experiments.preprocessing.Preprocessing`.
    """

    def __init__(self, path: os.PathLike | str):
        """Loads ``path``.

        Raises:
            larnn_jax.exported.ExportFormatError: a file that cannot be used, and why.
        """
        self.model = exported.load(path)
        self.preprocessing = Preprocessing(
            dataset=str(self.model.source.get("dataset", "")),
            steps=self.model.window_length,
            channels=self.model.channels,
            channel_mean=self.model.channel_mean,
            channel_std=self.model.channel_std,
            class_names=self.model.class_names,
        )

    @property
    def origin(self) -> dict[str, Any]:
        """Where the model comes from, for summaries: the file, and the epoch it records."""
        return {"exported": self.model.path, "epoch": self.model.source.get("epoch")}

    @property
    def window_length(self) -> int:
        return self.model.window_length

    @property
    def channels(self) -> int:
        return self.model.channels

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.model.class_names

    def predict(self, x: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """:meth:`larnn_jax.exported.ExportedClassifier.predict`."""
        return self.model.predict(x, lengths)

    def stream(self, stride: int) -> WindowStream:
        """:meth:`larnn_jax.exported.ExportedClassifier.stream`."""
        return self.model.stream(stride)
