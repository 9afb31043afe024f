"""The inputs of predictions: ``.npz`` files of sequences, and text or a stream of time steps.

* ``.npz``: an array ``X`` ``(N, T, C)`` of raw (unstandardised) sequences, optionally
  ``lengths`` ``(N,)`` (the valid steps of each sequence, the rest being padding) and ``y``
  ``(N,)`` (true classes); or, from a training-format file, ``X_test`` with ``y_test``
  (:func:`read_npz`).
* anything else: text, one time step per line with one value per channel, separated by commas
  (CSV) or by white space. Blank lines and lines starting with ``#`` are skipped, and so is a
  first line without any number (a header) (:func:`time_steps`). A file's rows are cut into
  windows of the run's length ``T`` every ``stride`` steps (:func:`sliding_windows`).

Every problem is an :class:`InputError` that names the file (or ``<stdin>``) and the line.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import zipfile
from collections.abc import Iterable, Iterator

import numpy as np

from experiments.data import DataError
from experiments.data.npz import check_column, check_inputs, read_arrays
from experiments.preprocessing import Preprocessing
from larnn_jax.inference import InputRangeError

#: How errors name standard input.
STDIN = "<stdin>"
#: What a byte that is not UTF-8 reads as (U+FFFD, the replacement character).
NOT_UTF8 = "\ufffd"


class InputError(ValueError):
    """Input that cannot be classified; the message names the file (or ``<stdin>``) and line."""


def parse_time_step(
    line: str, preprocessing: Preprocessing, where: str, number: int
) -> np.ndarray | None:
    """One line of text input → its ``(C,)`` float32 values; None for a blank or ``#`` line.

    Values are separated by commas when the line has any, else by white space; ``C`` is the
    run's number of channels.

    Raises:
        InputError: ``"<where>: line <number>: ..."``: the wrong number of values, a value
            that is not a number (or not UTF-8 text), one that is NaN or infinite (or beyond
            float32), or one that the run's standardisation takes beyond float32.
    """
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    tokens = [token.strip() for token in text.split(",")] if "," in text else text.split()
    channels = preprocessing.channels
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
            undecodable = ": the line is not UTF-8 text" if NOT_UTF8 in token else ""
            raise InputError(
                f"{where}: line {number}: value {index + 1}, {token!r}, is not a number"
                + undecodable
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
    try:
        preprocessing.apply(values)
    except InputRangeError as err:
        column = err.index[-1]
        raise InputError(
            f"{where}: line {number}: value {column + 1}, {tokens[column]!r}, {err.problem}"
        ) from None
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


def time_steps(
    lines: Iterable[str | bytes], preprocessing: Preprocessing, where: str
) -> Iterator[tuple[int, np.ndarray | InputError]]:
    """``(line number, values or InputError)`` for every time step of ``lines`` (text, or bytes
    read as UTF-8; a byte that is not UTF-8 reads as U+FFFD, which no number holds).

    A first content line without any number is a header and skipped; blank and ``#`` lines are
    skipped. A bad line yields its :class:`InputError` instead of values, so that a stream can
    report it and go on.
    """
    seen_content = False
    for number, raw in enumerate(lines, start=1):
        line = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        if not seen_content and is_header(line):
            seen_content = True
            continue
        try:
            values = parse_time_step(line, preprocessing, where, number)
        except InputError as err:
            seen_content = True
            yield number, err
            continue
        if values is not None:
            seen_content = True
            yield number, values


def read_text(path: pathlib.Path, preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """A text file's time steps ``(R, C)`` float32 and the line of each ``(R,)``.

    Raises:
        InputError: the first bad line (:func:`parse_time_step`), or an unreadable file.
    """
    rows, lines = [], []
    try:
        with path.open(encoding="utf-8", errors="replace", newline=None) as file:
            for number, values in time_steps(file, preprocessing, str(path)):
                if isinstance(values, InputError):
                    raise values
                rows.append(values)
                lines.append(number)
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({err.strerror or err})") from err
    values = np.array(rows, np.float32).reshape(len(rows), preprocessing.channels)
    return values, np.array(lines, np.int64)


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
        lines: for text, the line of each time step read ``(S,)``; else None.
        key: for an ``.npz``, the name of the array ``x`` comes from.
    """

    x: np.ndarray
    lengths: np.ndarray | None = None
    labels: np.ndarray | None = None
    starts: np.ndarray | None = None
    lines: np.ndarray | None = None
    key: str = "X"

    @property
    def time_steps(self) -> int | None:
        """For text, the number of time steps read (``S``); else None."""
        return None if self.lines is None else len(self.lines)

    def name_value(self, index: tuple[int, ...]) -> str:
        """The value ``x[index]`` (sequence, step, channel) named as the input holds it:
        ``line L: value C, V,`` in text, ``X[i, t, c] = V`` in an ``.npz``."""
        if self.lines is None or self.starts is None:
            return npz_value(self.key, index, self.x[index])
        sequence, step, channel = index
        line = self.lines[self.starts[sequence] + step]
        return f"line {line}: value {channel + 1}, {self.x[index]!s},"


def npz_value(key: str, index: tuple[int, ...], value: object) -> str:
    """``KEY[i, j, k] = VALUE``: how errors name a value of an ``.npz`` array."""
    return f"{key}[{', '.join(map(str, index))}] = {value!s}"


def read_npz(path: pathlib.Path, preprocessing: Preprocessing) -> Sequences:
    """The sequences of an ``.npz`` file: ``X`` [, ``lengths``, ``y``], or ``X_test`` [,
    ``y_test``].

    Raises:
        InputError: a missing or malformed array, naming the file and the array.
    """
    try:
        arrays = read_arrays(path)
    except DataError as err:
        raise InputError(str(err)) from err
    key, label_key = ("X", "y") if "X" in arrays else ("X_test", "y_test")
    if key not in arrays:
        raise InputError(
            f"{path}: no array 'X' (nor 'X_test'); expected X (N, T, C) with optionally "
            f"lengths (N,) and y (N,) (found: {', '.join(arrays) or 'none'})"
        )
    try:
        x = check_inputs(path, key, arrays[key], None)
        channels = preprocessing.channels
        if x.shape[-1] != channels:
            raise InputError(
                f"{path}: {key} has {x.shape[-1]} channels (shape {x.shape}), but the model "
                f"was trained on {channels}"
            )
        try:
            preprocessing.apply(x)
        except InputRangeError as err:
            raise InputError(
                f"{path}: {npz_value(key, err.index, err.value)} {err.problem}"
            ) from None
        lengths = arrays.get("lengths") if key == "X" else None
        if lengths is not None:
            check_column(path, "lengths", lengths, len(x), "length")
            outside = np.flatnonzero((lengths < 1) | (lengths > x.shape[1]))
            if outside.size:
                row = outside[0]
                raise InputError(
                    f"{path}: lengths[{row}] = {lengths[row]} is outside 1..{x.shape[1]}"
                )
            lengths = lengths.astype(np.int32)
        labels = arrays.get(label_key)
        if labels is not None:
            check_column(path, label_key, labels, len(x), "label")
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
    return Sequences(x, lengths, labels, key=key)


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
    values, lines = read_text(path, preprocessing)
    length = preprocessing.steps
    if len(values) < length:
        where = f"{path}: line {lines[-1]}" if len(lines) else f"{path}"
        raise InputError(
            f"{where}: the input ends after {len(values)} time steps, fewer than one window of "
            f"{length}"
        )
    windows, starts = sliding_windows(values, length, stride)
    return Sequences(windows, starts=starts, lines=lines)
