"""A trained run's model as an object: :class:`Predictor` classifies raw sequences, and
:class:`StreamPredictor` a stream of samples fed one time step at a time.

The model is the run's selected epoch (or a given one), and every input goes through the run's
own preprocessing: the channel standardisation fitted on its training rows, read from the run's
``preprocessing.json`` (:mod:`experiments.preprocessing`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.config import TrainConfig, load_config_dataset
from experiments.preprocessing import Preprocessing, load_preprocessing
from experiments.restore import open_checkpoint
from experiments.steps import model_variables
from larnn_jax.models import SequenceClassifier
from larnn_jax.typing import Carry, PyTree


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A stream's prediction for one window.

    Attributes:
        window: the window's index ``k`` (0, 1, ...).
        start_step: its first time step, ``k × stride`` (time steps counted from 0).
        probabilities: ``(K,)`` the probability of every class.
    """

    window: int
    start_step: int
    probabilities: np.ndarray


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
            logits = model.apply(variables, x, deterministic=True, seq_lengths=lengths)
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
        """
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[-1] != self.channels:
            raise ValueError(
                f"expected sequences of shape (N, T, {self.channels}), got shape {x.shape}"
            )
        rows = len(x)
        if rows == 0:
            return np.zeros((0, len(self.class_names)), np.float32)
        x = self.preprocessing.apply(x)
        batch = min(batch_size or self.config.batch_size, rows)
        padded = -(-rows // batch) * batch
        x = np.concatenate([x, np.zeros((padded - rows, *x.shape[1:]), x.dtype)])
        if lengths is not None:
            lengths = np.asarray(lengths, np.int32)
            lengths = np.concatenate([lengths, np.full(padded - rows, x.shape[1], np.int32)])
        results = [
            np.asarray(
                self._probabilities(
                    self.variables,
                    x[start : start + batch],
                    None if lengths is None else lengths[start : start + batch],
                )
            )
            for start in range(0, padded, batch)
        ]
        return np.concatenate(results)[:rows]

    def stream(self, stride: int) -> StreamPredictor:
        """A :class:`StreamPredictor` that classifies the last ``T`` samples every ``stride``."""
        return StreamPredictor(self, stride)


class StreamPredictor:
    """Classifies a stream of samples, fed one time step at a time.

    After every ``stride`` samples (and at least ``T``), a prediction of the last ``T`` samples:
    the windows :func:`~experiments.prediction.inputs.sliding_windows` cuts from the whole series, with the same probabilities
    as :meth:`Predictor.predict` on them, to float rounding.

    A window is never recomputed from scratch: the stream keeps ``ceil(T / stride)`` carries of
    the network, one per window in progress, started ``stride`` steps apart; every sample
    advances all of them by one step of the network (:meth:`SequenceClassifier.step`) in one
    jitted call, their carries batched; the carry whose window is complete gives the prediction
    and is restarted when its next window begins.

    Attributes:
        stride: samples between predictions (``>= 1``; need not divide ``T``).
        slots: the number of carries, ``ceil(T / stride)``.
        samples: the samples pushed so far.
        latencies: the seconds each :meth:`push` took in the network (the jitted step, waited
            for), one per sample.
    """

    def __init__(self, predictor: Predictor, stride: int):
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.predictor = predictor
        self.stride = stride
        self.slots = -(-predictor.window_length // stride)
        self.samples = 0
        self.latencies: list[float] = []
        model = predictor.model
        initial = model.initialize_carries((self.slots,))

        variables = predictor.variables

        def advance(
            carries: tuple[Carry, ...], sample: jax.Array, restart: jax.Array
        ) -> tuple[tuple[Carry, ...], jax.Array]:
            """Restarts the carries where ``restart`` ``(slots,)``, then steps all of them on
            ``sample`` ``(C,)``; returns the carries and every slot's probabilities."""

            def reset(start: jax.Array, carry: jax.Array) -> jax.Array:
                return jnp.where(restart.reshape((-1,) + (1,) * (carry.ndim - 1)), start, carry)

            carries = jax.tree.map(reset, initial, carries)
            x = jnp.broadcast_to(sample, (self.slots, sample.shape[-1]))
            carries, logits = model.apply(variables, carries, x, method="step")
            return carries, jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

        # The variables are constants of the compiled step rather than arguments: a call then
        # passes only the carries, which takes about a third off a push at the paper's sizes.
        self._advance = jax.jit(advance)
        self._carries = initial
        # Compile now, for the initial carries and for the ones it returns (an argument that a
        # jitted call returned can select another compiled version than a fresh one), so that
        # no sample waits for a compilation.
        carries = initial
        for _ in range(2):
            carries, warm = self._advance(
                carries,
                np.zeros(predictor.channels, np.float32),
                np.zeros(self.slots, bool),
            )
        jax.block_until_ready(warm)

    def push(self, sample: np.ndarray) -> Prediction | None:
        """Feeds one raw time step ``(C,)``; returns the prediction of the window that it
        completes, if any.

        Raises:
            ValueError: the sample has the wrong shape or a value that is not finite; the
                stream is left as it was.
        """
        sample = np.asarray(sample, np.float32)
        if sample.shape != (self.predictor.channels,) or not np.all(np.isfinite(sample)):
            raise ValueError(
                f"a sample must hold {self.predictor.channels} finite numbers; got {sample!r}"
            )
        step = self.samples
        restart = np.zeros(self.slots, bool)
        if step % self.stride == 0:  # a window begins here
            restart[(step // self.stride) % self.slots] = True
        started = time.perf_counter()
        carries, probabilities = self._advance(
            self._carries,
            self.predictor.preprocessing.apply(sample),
            restart,
        )
        jax.block_until_ready(probabilities)
        self.latencies.append(time.perf_counter() - started)
        self._carries = carries
        self.samples += 1
        start = step + 1 - self.predictor.window_length  # of the window ending here
        if start < 0 or start % self.stride:
            return None
        window = start // self.stride
        return Prediction(window, start, np.asarray(probabilities[window % self.slots]))

    def latency_summary(self) -> dict[str, Any]:
        """The latency per sample so far: count, median, 99th percentile and mean, in µs."""
        if not self.latencies:
            return {"samples": 0}
        micro = np.asarray(self.latencies) * 1e6
        return {
            "samples": len(micro),
            "median_us": float(np.median(micro)),
            "p99_us": float(np.percentile(micro, 99)),
            "mean_us": float(np.mean(micro)),
            "carries": self.slots,
        }
