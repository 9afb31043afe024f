"""Running a trained classifier on raw data, with JAX and NumPy only.

What a classifier needs around it to classify what a sensor gives, shared by the training
pipeline's predictions (``experiments.prediction``) and by exported models
(:mod:`larnn_jax.exported`), which run without Flax:

* :func:`standardize`: raw inputs ``(..., C)`` → what the model reads, with the training's
  channel statistics; a value the model cannot read is an :class:`InputRangeError`;
* :func:`predict_in_batches`: class probabilities of ``N`` sequences, in batches of one size (one
  compilation);
* :class:`WindowStream`: a stream of samples, fed one time step at a time, classified every
  ``stride`` samples over its last ``T``, from the network's one-step function.

Shapes: ``N`` sequences, ``T`` time steps (``T`` of the training sequences: the window), ``C``
channels, ``K`` classes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: A batch's class probabilities: ``(x (B, T, C) standardised, lengths (B,) int32 or None)`` →
#: ``(B, K)``.
ProbabilitiesFunction = Callable[[np.ndarray, "np.ndarray | None"], Any]
#: One time step of the network in evaluation mode: ``(carries, x (S, C) standardised)`` →
#: ``(carries after it, logits (S, K))``; any pytree of carries (batch axis first).
StepFunction = Callable[[Any, jax.Array], tuple[Any, jax.Array]]


#: What :class:`InputRangeError` says of a value that the network cannot take: with it, the
#: network's float32 sums overflow and its output is NaN or infinite.
TOO_LARGE_FOR_THE_MODEL = "is too large for the model: its float32 sums overflow"


class InputRangeError(ValueError):
    """An input value that the model cannot read: not a finite float32, taken beyond float32 by
    the standardisation, or so large that the network's own float32 sums overflow (its output
    NaN or infinite: :func:`predict_in_batches`, :meth:`WindowStream.push`).

    Attributes:
        index: the value's index in the input array.
        value: the value.
        problem: what is wrong with it, e.g. ``"is not a finite float32"``.
    """

    def __init__(self, index: tuple[int, ...], value: Any, problem: str):
        super().__init__(f"x[{', '.join(map(str, index))}] = {value!s} {problem}")
        self.index, self.value, self.problem = index, value, problem


def standardize(x: Any, mean: np.ndarray | None, std: np.ndarray | None) -> np.ndarray:
    """Raw inputs ``(..., C)`` → what the model reads: ``(x - mean) / std`` in float32 (``x``
    itself, as float32, where ``mean`` is None: a model trained without standardisation).

    Raises:
        InputRangeError: a value that is not a finite float32, or that the standardisation takes
            beyond float32 (a huge value divided by a standard deviation below 1): the model
            would give NaN probabilities for its sequence.
    """
    raw = np.asarray(x)
    with np.errstate(over="ignore", invalid="ignore"):
        values = raw.astype(np.float32)
        if mean is not None:
            values = (values - mean) / std
    outside = np.argwhere(~np.isfinite(values))
    if outside.size:
        index = tuple(int(i) for i in outside[0])
        value = raw[index]
        if np.isfinite(np.float32(value)) and mean is not None and std is not None:
            channel = index[-1]
            problem = (
                f"is too large for the run's standardisation: (x - {mean[channel]:.6g}) "
                f"/ {std[channel]:.6g} overflows float32"
            )
        else:
            problem = "is not a finite float32"
        raise InputRangeError(index, value, problem)
    return values


def predict_in_batches(
    probabilities: ProbabilitiesFunction,
    x: np.ndarray,
    lengths: np.ndarray | None,
    batch_size: int,
    num_classes: int,
    *,
    raw: np.ndarray | None = None,
) -> np.ndarray:
    """``probabilities`` over ``x`` ``(N, T, C)`` (standardised) in batches of ``batch_size``:
    ``(N, K)`` float32.

    The last batch is padded to ``batch_size`` (with zeros, lengths ``T``), so that a jitted
    ``probabilities`` compiles once per sequence length.

    Args:
        raw: ``x`` before its standardisation, which errors name (default: ``x``).

    Raises:
        InputRangeError: the output of a sequence is NaN or infinite (values so large that the
            network's float32 sums overflow); it names the first such sequence's largest
            standardised value, never a NaN counted as a class.
    """
    rows = len(x)
    if rows == 0:
        return np.zeros((0, num_classes), np.float32)
    batch = min(batch_size, rows)
    padded = -(-rows // batch) * batch
    x = np.concatenate([x, np.zeros((padded - rows, *x.shape[1:]), x.dtype)])
    if lengths is not None:
        lengths = np.asarray(lengths, np.int32)
        lengths = np.concatenate([lengths, np.full(padded - rows, x.shape[1], np.int32)])
    results = [
        np.asarray(
            probabilities(
                x[start : start + batch],
                None if lengths is None else lengths[start : start + batch],
            )
        )
        for start in range(0, padded, batch)
    ]
    result = np.concatenate(results)[:rows]
    overflowed = np.flatnonzero(~np.isfinite(result).all(axis=-1))
    if overflowed.size:
        row = int(overflowed[0])
        valid = x[row, : x.shape[1] if lengths is None else int(lengths[row])]
        step, channel = np.unravel_index(np.argmax(np.abs(valid)), valid.shape)
        index = (row, int(step), int(channel))
        value = (x if raw is None else np.asarray(raw))[index]
        raise InputRangeError(index, value, TOO_LARGE_FOR_THE_MODEL)
    return result


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


class WindowStream:
    """Classifies a stream of samples, fed one time step at a time.

    After every ``stride`` samples (and at least ``T``), a prediction of the last ``T`` samples:
    the windows that a sliding window of ``T`` every ``stride`` steps cuts from the whole series,
    with the probabilities of the whole-sequence classifier on them, to float rounding.

    A window is never recomputed from scratch: the stream keeps ``ceil(T / stride)`` carries of
    the network, one per window in progress, started ``stride`` steps apart; every sample
    advances all of them by one step of the network in one jitted call, their carries batched;
    the carry whose window is complete gives the prediction and is restarted when its next
    window begins.

    Args:
        step: the network's one-step function (:data:`StepFunction`); it becomes part of a
            jitted call, so whatever it closes over (the variables) are constants of it.
        initial_carries: ``slots`` → the carries of a batch of ``slots`` fresh sequences.
        window_length: ``T``.
        stride: samples between predictions (``>= 1``; need not divide ``T``).
        standardize: a raw sample ``(C,)`` → what the model reads (:func:`standardize` with the
            training's statistics).
        channels: ``C``.

    Attributes:
        stride: samples between predictions.
        slots: the number of carries, ``ceil(T / stride)``.
        samples: the samples pushed so far.
        latencies: the seconds each :meth:`push` took in the network (the jitted step, waited
            for), one per sample.
    """

    def __init__(
        self,
        step: StepFunction,
        initial_carries: Callable[[int], Any],
        *,
        window_length: int,
        stride: int,
        standardize: Callable[[np.ndarray], np.ndarray],
        channels: int,
    ):
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.stride = stride
        self.window_length = window_length
        self.channels = channels
        self.slots = -(-window_length // stride)
        self.samples = 0
        self.latencies: list[float] = []
        self._standardize = standardize
        initial = initial_carries(self.slots)

        def advance(
            carries: Any, sample: jax.Array, restart: jax.Array
        ) -> tuple[Any, jax.Array, jax.Array]:
            """Restarts the carries where ``restart`` ``(slots,)``, then steps all of them on
            ``sample`` ``(C,)``; returns the carries, every slot's probabilities and whether all
            of them are finite."""

            def reset(start: jax.Array, carry: jax.Array) -> jax.Array:
                return jnp.where(restart.reshape((-1,) + (1,) * (carry.ndim - 1)), start, carry)

            carries = jax.tree.map(reset, initial, carries)
            x = jnp.broadcast_to(sample, (self.slots, sample.shape[-1]))
            carries, logits = step(carries, x)
            probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            finite = jnp.all(jnp.isfinite(probabilities))
            for leaf in jax.tree.leaves(carries):
                finite &= jnp.all(jnp.isfinite(leaf))
            return carries, probabilities, finite

        # The variables are constants of the compiled step rather than arguments: a call then
        # passes only the carries, which takes about a third off a push at the paper's sizes.
        self._advance = jax.jit(advance)
        self._carries = initial
        # Compile now, for the initial carries and for the ones it returns (an argument that a
        # jitted call returned can select another compiled version than a fresh one), so that
        # no sample waits for a compilation.
        carries = initial
        for _ in range(2):
            carries, warm, _ = self._advance(
                carries, np.zeros(channels, np.float32), np.zeros(self.slots, bool)
            )
        jax.block_until_ready(warm)

    def push(self, sample: np.ndarray) -> Prediction | None:
        """Feeds one raw time step ``(C,)``; returns the prediction of the window that it
        completes, if any.

        Raises:
            ValueError: the sample has the wrong shape or a value that is not finite;
                :class:`InputRangeError`: a value that the standardisation, or the network's
                float32 sums, take beyond float32. Either way the stream is left as it was.
        """
        sample = np.asarray(sample, np.float32)
        if sample.shape != (self.channels,) or not np.all(np.isfinite(sample)):
            raise ValueError(f"a sample must hold {self.channels} finite numbers; got {sample!r}")
        standardised = self._standardize(sample)
        step = self.samples
        restart = np.zeros(self.slots, bool)
        if step % self.stride == 0:  # a window begins here
            restart[(step // self.stride) % self.slots] = True
        started = time.perf_counter()
        carries, probabilities, finite = self._advance(self._carries, standardised, restart)
        jax.block_until_ready(probabilities)
        if not finite:
            channel = int(np.argmax(np.abs(standardised)))
            raise InputRangeError((channel,), sample[channel], TOO_LARGE_FOR_THE_MODEL)
        self.latencies.append(time.perf_counter() - started)
        self._carries = carries
        self.samples += 1
        start = step + 1 - self.window_length  # of the window ending here
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
