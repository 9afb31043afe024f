"""Classify new sequences with a trained run's model: from files, or from a live stream of samples.

    python -m experiments.predict --checkpoint runs/best --input new.npz --output predictions.csv
    python -m experiments.predict --checkpoint runs/best --input recording.csv --stride 64
    sensor | python -m experiments.predict --checkpoint runs/best --stream --stride 32

The model is the run's selected epoch (or ``--step N``), and every input goes through the run's
own preprocessing: the channel standardisation fitted on its training rows, read from the run's
``preprocessing.json`` (:mod:`experiments.preprocessing`).

Inputs (``--input``):

* ``.npz``: an array ``X`` ``(N, T, C)`` of raw (unstandardised) sequences, optionally
  ``lengths`` ``(N,)`` (the valid steps of each sequence, the rest being padding) and ``y``
  ``(N,)`` (true classes: the summary then gives the accuracy); or, from a training-format
  file, ``X_test`` with ``y_test``.
* anything else: text, one time step per line with one value per channel, separated by commas
  (CSV) or by white space. Blank lines and lines starting with ``#`` are skipped, and so is a
  first line without any number (a header). The rows are cut into windows of the run's length
  ``T`` every ``--stride`` steps.

Output (``--output FILE``, else standard output): one row per sequence, CSV (``sequence``,
``start_step`` for windows cut from text, ``predicted`` and ``p_<class>`` for every class) or JSON
lines (``--format jsonl``, or an output file ending in ``.jsonl``/``.json``). A summary (JSON)
goes to standard output, or to standard error when the predictions do.

``--stream``: reads one time step per line from standard input, as a sensor sends them, and
prints a prediction every ``--stride`` steps, each of the last ``T`` steps: the windows the model
was trained on (see :class:`StreamPredictor`). A bad line is reported on standard error with its
line number and skipped. At the end of the input (or at Ctrl-C, or when the reader of the
predictions goes away), a summary with the latency per sample goes to standard error.

Exit status: 0 success, 2 a usage or input error (bad input file or line, unusable run folder or
checkpoint), 1 the run's dataset could not be loaded where it is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import pathlib
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from experiments.checkpoints import CheckpointError
from experiments.config import ConfigError, TrainConfig, load_config_dataset
from experiments.evaluate import add_checkpoint_arguments, open_checkpoint
from experiments.preprocessing import Preprocessing, PreprocessingError, load_preprocessing
from experiments.steps import model_variables
from experiments.train import configure_logging
from larnn_jax.data import DataError, _check_column, _check_inputs
from larnn_jax.models import SequenceClassifier

log = logging.getLogger("experiments.predict")  # not __name__: "__main__" under -m

STDIN = "<stdin>"
FORMATS = ("csv", "jsonl")


class InputError(ValueError):
    """Input that cannot be classified; the message names the file (or ``<stdin>``) and line."""


# ------------------------------------------------------------------------------------------------
# Reading inputs


def parse_time_step(line: str, channels: int, where: str, number: int) -> np.ndarray | None:
    """One line of text input → its ``(C,)`` float32 values; None for a blank or ``#`` line.

    Values are separated by commas when the line has any, else by white space.

    Raises:
        InputError: ``"<where>: line <number>: ..."``: the wrong number of values, a value
            that is not a number, or one that is NaN or infinite (or beyond float32).
    """
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    tokens = [token.strip() for token in text.split(",")] if "," in text else text.split()
    if len(tokens) != channels:
        raise InputError(
            f"{where}: line {number}: expected {channels} values, one per channel, found "
            f"{len(tokens)}"
        )
    values = np.empty(channels, np.float32)
    for index, token in enumerate(tokens):
        try:
            value = float(token)
        except ValueError:
            raise InputError(
                f"{where}: line {number}: value {index + 1}, {token!r}, is not a number"
            ) from None
        if not math.isfinite(value):
            raise InputError(
                f"{where}: line {number}: value {index + 1}, {token!r}, is NaN or infinite"
            )
        with np.errstate(over="ignore"):
            values[index] = value
        if not np.isfinite(values[index]):
            raise InputError(
                f"{where}: line {number}: value {index + 1}, {token!r}, is too large for float32"
            )
    return values


def is_header(line: str) -> bool:
    """Whether ``line`` names columns: it has values and none of them is a number."""
    tokens = line.replace(",", " ").split()
    if not tokens or line.lstrip().startswith("#"):
        return False
    for token in tokens:
        try:
            float(token)
            return False
        except ValueError:
            pass
    return True


def time_steps(lines: Iterable[str], channels: int, where: str) -> Iterator[tuple[int, Any]]:
    """``(line number, values or InputError)`` for every time step of ``lines``.

    A first content line without any number is a header and skipped; blank and ``#`` lines are
    skipped. A bad line yields its :class:`InputError` instead of values, so that a stream can
    report it and go on.
    """
    seen_content = False
    for number, line in enumerate(lines, start=1):
        if not seen_content and is_header(line):
            seen_content = True
            continue
        try:
            values = parse_time_step(line, channels, where, number)
        except InputError as err:
            seen_content = True
            yield number, err
            continue
        if values is not None:
            seen_content = True
            yield number, values


def read_text(path: pathlib.Path, channels: int) -> tuple[np.ndarray, int]:
    """A text file's time steps ``(R, C)`` float32 and the line of the last one (0: none).

    Raises:
        InputError: the first bad line (:func:`parse_time_step`), or an unreadable file.
    """
    rows = []
    last_line = 0
    try:
        with path.open(encoding="utf-8", errors="replace", newline=None) as file:
            for last_line, values in time_steps(file, channels, str(path)):  # noqa: B007
                if isinstance(values, InputError):
                    raise values
                rows.append(values)
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({err.strerror or err})") from err
    return np.array(rows, np.float32).reshape(len(rows), channels), last_line


def sliding_windows(values: np.ndarray, length: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``length`` steps every ``stride`` steps of ``values`` ``(R, C)``:
    ``(windows (N, length, C), first step of each (N,))``, the windows that fit whole."""
    if len(values) < length:
        return np.empty((0, length, values.shape[-1]), values.dtype), np.empty(0, np.int64)
    view = np.lib.stride_tricks.sliding_window_view(values, length, axis=0)  # (R-L+1, C, L)
    starts = np.arange(0, len(values) - length + 1, stride)
    return np.ascontiguousarray(view[starts].swapaxes(1, 2)), starts


@dataclasses.dataclass(frozen=True)
class Sequences:
    """What an input file holds for classification.

    Attributes:
        x: raw sequences ``(N, T, C)`` float32.
        lengths: valid steps of each sequence ``(N,)``, or None (all ``T``).
        labels: true classes ``(N,)``, or None.
        starts: for windows cut from text, the first time step of each ``(N,)``; else None.
        time_steps: for text, the number of time steps read; else None.
    """

    x: np.ndarray
    lengths: np.ndarray | None = None
    labels: np.ndarray | None = None
    starts: np.ndarray | None = None
    time_steps: int | None = None


def read_npz(path: pathlib.Path, preprocessing: Preprocessing) -> Sequences:
    """The sequences of an ``.npz`` file: ``X`` [, ``lengths``, ``y``], or ``X_test`` [,
    ``y_test``].

    Raises:
        InputError: a missing or malformed array, naming the file and the array.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: not a readable .npz file of plain arrays ({err})") from err
    key, label_key = ("X", "y") if "X" in arrays else ("X_test", "y_test")
    if key not in arrays:
        raise InputError(
            f"{path}: no array 'X' (nor 'X_test'); expected X (N, T, C) with optionally "
            f"lengths (N,) and y (N,) (found: {', '.join(arrays) or 'none'})"
        )
    try:
        x = _check_inputs(path, key, arrays[key], None)
        channels = preprocessing.channels
        if x.shape[-1] != channels:
            raise InputError(
                f"{path}: {key} has {x.shape[-1]} channels (shape {x.shape}), but the model "
                f"was trained on {channels}"
            )
        lengths = arrays.get("lengths") if key == "X" else None
        if lengths is not None:
            _check_column(path, "lengths", lengths, len(x), "length")
            outside = np.flatnonzero((lengths < 1) | (lengths > x.shape[1]))
            if outside.size:
                row = outside[0]
                raise InputError(
                    f"{path}: lengths[{row}] = {lengths[row]} is outside 1..{x.shape[1]}"
                )
            lengths = lengths.astype(np.int32)
        labels = arrays.get(label_key)
        if labels is not None:
            _check_column(path, label_key, labels, len(x), "label")
            classes = len(preprocessing.class_names)
            outside = np.flatnonzero(labels >= classes)
            if outside.size:
                row = outside[0]
                raise InputError(
                    f"{path}: {label_key}[{row}] = {labels[row]} is not a class of the model "
                    f"(0..{classes - 1})"
                )
    except DataError as err:
        raise InputError(str(err)) from err
    return Sequences(x, lengths, labels)


def read_input(path: pathlib.Path, preprocessing: Preprocessing, stride: int) -> Sequences:
    """The sequences to classify in ``path``: an ``.npz`` file (:func:`read_npz`), else text cut
    into windows of the run's length every ``stride`` steps.

    Raises:
        InputError: a missing, unreadable or malformed file, or text shorter than one window.
    """
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if zipfile.is_zipfile(path) or path.suffix == ".npz":
        return read_npz(path, preprocessing)
    values, last_line = read_text(path, preprocessing.channels)
    length = preprocessing.steps
    if len(values) < length:
        where = f"{path}: line {last_line}" if last_line else f"{path}"
        raise InputError(
            f"{where}: the input ends after {len(values)} time steps, fewer than one window of "
            f"{length}"
        )
    windows, starts = sliding_windows(values, length, stride)
    return Sequences(windows, starts=starts, time_steps=len(values))


# ------------------------------------------------------------------------------------------------
# The predictor


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
        variables: Any,
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

        def probabilities(variables: Any, x: jax.Array, lengths: jax.Array | None) -> jax.Array:
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
                :func:`experiments.evaluate.open_checkpoint`).
            data_dir: where the run's dataset lives, for runs saved without
                ``preprocessing.json`` (their standardisation is recomputed from it).

        Raises:
            CheckpointError: no usable checkpoint, or the requested step is absent or bad.
            PreprocessingError: an unreadable ``preprocessing.json``.
            larnn_jax.data.DataError: no ``preprocessing.json`` and no dataset to recompute it.
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
    the windows :func:`sliding_windows` cuts from the whole series, with the same probabilities
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

        def advance(carries: Any, sample: jax.Array, restart: jax.Array) -> tuple[Any, jax.Array]:
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


# ------------------------------------------------------------------------------------------------
# Writing predictions


def output_format(path: str | None, requested: str | None) -> str:
    """``requested``, else ``jsonl`` for an output file ending in ``.jsonl`` or ``.json``, else
    ``csv``."""
    if requested is not None:
        return requested
    if path is not None and pathlib.Path(path).suffix.lower() in (".jsonl", ".json"):
        return "jsonl"
    return "csv"


class PredictionWriter:
    """Writes one row per prediction: CSV (with a header) or JSON lines.

    Args:
        file: where to write.
        kind: ``'csv'`` or ``'jsonl'``.
        class_names: the classes, in the order of the probabilities.
        with_start: include ``start_step`` (windows cut from a series).
    """

    def __init__(self, file: TextIO, kind: str, class_names: Sequence[str], with_start: bool):
        self.file, self.kind, self.class_names, self.with_start = (
            file,
            kind,
            list(class_names),
            with_start,
        )
        if kind == "csv":
            columns = ["sequence", *(["start_step"] if with_start else []), "predicted"]
            columns += [f"p_{name}" for name in self.class_names]
            file.write(",".join(columns) + "\n")

    def write(self, sequence: int, probabilities: np.ndarray, start_step: int | None) -> None:
        """One row: the sequence's index, its first step, the predicted class, every class's
        probability (6 significant digits)."""
        predicted = self.class_names[int(np.argmax(probabilities))]
        shown = [f"{float(p):.6g}" for p in probabilities]
        if self.kind == "csv":
            fields = [str(sequence), *([str(start_step)] if self.with_start else []), predicted]
            self.file.write(",".join(fields + shown) + "\n")
            return
        row: dict[str, Any] = {"sequence": sequence}
        if self.with_start:
            row["start_step"] = start_step
        row["predicted"] = predicted
        row["probabilities"] = {
            name: float(text) for name, text in zip(self.class_names, shown, strict=True)
        }
        self.file.write(json.dumps(row) + "\n")


def write_atomically(path: pathlib.Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file: the file is whole or unchanged."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Command line


def classify_file(
    predictor: Predictor, path: pathlib.Path, stride: int, kind: str
) -> tuple[str, dict[str, Any]]:
    """Classifies every sequence of the input file ``path``; returns the predictions in
    ``kind`` and the summary."""
    started = time.perf_counter()
    sequences = read_input(path, predictor.preprocessing, stride)
    probabilities = predictor.predict(sequences.x, sequences.lengths)
    text = io.StringIO()
    writer = PredictionWriter(text, kind, predictor.class_names, sequences.starts is not None)
    for index, row in enumerate(probabilities):
        start = None if sequences.starts is None else int(sequences.starts[index])
        writer.write(index, row, start)
    predicted = probabilities.argmax(axis=-1)
    counts = np.bincount(predicted, minlength=len(predictor.class_names))
    summary: dict[str, Any] = {
        "checkpoint": str(predictor.checkpoint_dir),
        "epoch": predictor.epoch,
        "input": str(path),
        "sequences": len(probabilities),
    }
    if sequences.starts is not None:
        covered = int(sequences.starts[-1]) + predictor.window_length
        summary["windows"] = {
            "length": predictor.window_length,
            "stride": stride,
            "time_steps": sequences.time_steps,
            "time_steps_after_the_last_window": sequences.time_steps - covered,
        }
    summary["predicted"] = dict(zip(predictor.class_names, map(int, counts), strict=True))
    if sequences.labels is not None:
        summary["accuracy"] = float(np.mean(predicted == sequences.labels))
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return text.getvalue(), summary


def run_stream(
    predictor: Predictor, lines: Iterable[str], stride: int, out: TextIO, err: TextIO, kind: str
) -> dict[str, Any]:
    """Classifies the stream ``lines`` (one time step each) as ``--stream`` does: predictions to
    ``out`` as they come, bad lines reported to ``err`` and skipped. Returns the summary."""
    stream = predictor.stream(stride)
    writer = PredictionWriter(out, kind, predictor.class_names, with_start=True)
    out.flush()
    skipped = predictions = 0
    stopped = None
    try:
        for _, values in time_steps(lines, predictor.channels, STDIN):
            if isinstance(values, InputError):
                skipped += 1
                print(f"error: {values}; skipped", file=err, flush=True)
                continue
            prediction = stream.push(values)
            if prediction is not None:
                writer.write(prediction.window, prediction.probabilities, prediction.start_step)
                out.flush()
                predictions += 1
    except KeyboardInterrupt:  # Ctrl-C ends a live stream: still say what it did
        stopped = "interrupted"
    except BrokenPipeError:  # the reader of the predictions went away (e.g. `| head`)
        stopped = "output closed"
    summary = {
        "checkpoint": str(predictor.checkpoint_dir),
        "epoch": predictor.epoch,
        "window": predictor.window_length,
        "stride": stride,
        "samples": stream.samples,
        "skipped_lines": skipped,
        "predictions": predictions,
        "latency_per_sample": stream.latency_summary(),
    }
    if stopped is not None:
        summary["stopped"] = stopped
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.predict",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    add_checkpoint_arguments(parser, "use")  # --data-dir: for runs without preprocessing.json
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="FILE", help=".npz, or text/CSV (see below)")
    source.add_argument(
        "--stream", action="store_true", help="read one time step per line from standard input"
    )
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="where the predictions go (default: standard output)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="csv or jsonl (default: jsonl for an --output ending in .jsonl or .json, else csv)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        metavar="N",
        help="time steps between the windows cut from text or a stream (default: half the "
        "run's window length T, as UCI HAR's windows overlap)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, 1 or 2: see the module's doc)."""
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stride is not None and args.stride < 1:
        parser.error(f"--stride must be >= 1, got {args.stride}")
    kind = output_format(args.output, args.format)
    try:
        predictor = Predictor.from_run(args.checkpoint, step=args.step, data_dir=args.data_dir)
        stride = args.stride or max(1, predictor.window_length // 2)
        if args.stream:
            return _stream(predictor, stride, kind, args.output)
        text, summary = classify_file(predictor, pathlib.Path(args.input), stride, kind)
    except (InputError, CheckpointError, PreprocessingError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.output is None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error
            _discard_stdout()
        print(json.dumps(summary, indent=2), file=sys.stderr)
    else:
        write_atomically(pathlib.Path(args.output), text)
        print(json.dumps({**summary, "output": args.output}, indent=2))
    return 0


def _stream(predictor: Predictor, stride: int, kind: str, output: str | None) -> int:
    """``--stream``: standard input to ``output`` (or standard output) until the input ends."""
    lines = iter(sys.stdin.readline, "")
    with open(output, "w") if output else contextlib.nullcontext(sys.stdout) as out:
        summary = run_stream(predictor, lines, stride, out, sys.stderr, kind)
    if summary.get("stopped") == "output closed" and output is None:
        _discard_stdout()
    print(json.dumps(summary, indent=2), file=sys.stderr)
    return 130 if summary.get("stopped") == "interrupted" else 0


def _discard_stdout() -> None:
    """Points standard output at the null device, so that nothing written to the closed pipe
    (not even Python's flush at exit) raises again."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


if __name__ == "__main__":
    sys.exit(main())
