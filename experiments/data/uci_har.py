"""The UCI HAR dataset: its official text files parsed into arrays, and a cache of those arrays.

UCI HAR ("Human Activity Recognition Using Smartphones", UCI ML Repository id 240): the 9 raw
inertial channels of :data:`~experiments.data.download.UCI_HAR_CHANNELS` sampled at 50 Hz in
windows of 128 steps, 6 activities, 7352 training windows from 21 subjects and 2947 test windows
from 9 other subjects. :func:`load_uci_har` reads the official text files (downloading them if
absent, :mod:`experiments.data.download`), checks each file against the SHA-256 table, and caches
the parsed arrays in a ``.npz`` file so that later loads take a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import warnings
import zipfile

import numpy as np

from experiments.data.dataset import DataError, Split
from experiments.data.download import (
    INNER_ZIP,
    SPLITS,
    UCI_HAR_CHANNELS,
    UCI_HAR_FILES,
    UCI_HAR_FOLDER,
    UCI_HAR_URL,
    download_uci_har,
    missing_files,
    resolve_data_dir,
    signal_file,
    user_cache_dir,
    verify_files,
)
from experiments.files import atomic_write

#: Salt of the cache key: a new value when the cache's layout changes discards every cache.
CACHE_FORMAT = "larnn_jax.data uci_har cache v1"

# --------------------------------------------------------------------------------------------
# Parsing of the text files


def _parse_table(path: pathlib.Path, width: int | None, dtype: type[np.generic]) -> np.ndarray:
    """Parse a text file of whitespace-separated numbers, one row per line.

    Args:
        path: the file.
        width: the number of values every line must have; None takes the first line's.
        dtype: ``np.float32`` (values must be finite) or ``np.int64``.

    Returns:
        ``(rows, width)`` array of ``dtype``.
    """
    rows = [line.split() for line in path.read_bytes().splitlines()]
    if not rows:
        raise DataError(f"{path}: the file is empty")
    if width is None:
        width = len(rows[0])
        if width == 0:
            raise DataError(f"{path}: line 1: no values")
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    wrong = np.flatnonzero(lengths != width)
    if wrong.size:
        line = wrong[0]
        raise DataError(
            f"{path}: line {line + 1}: expected {width} value{'s' * (width != 1)}, "
            f"found {lengths[line]}"
        )
    try:
        table = np.array(rows, dtype=dtype)
    except (ValueError, OverflowError) as exc:
        raise _bad_token_error(path, rows, dtype) or DataError(f"{path}: {exc}") from exc
    if np.issubdtype(dtype, np.floating):
        not_finite = np.argwhere(~np.isfinite(table))
        if not_finite.size:
            line, col = not_finite[0]
            token = rows[line][col].decode("latin-1")
            raise DataError(
                f"{path}: line {line + 1}: value {col + 1}, {token!r}, is NaN or infinite"
            )
    return table


def _bad_token_error(
    path: pathlib.Path, rows: list[list[bytes]], dtype: type[np.generic]
) -> DataError | None:
    """The error for the first token that ``dtype`` cannot parse, None if there is none."""
    kind = "an integer" if np.issubdtype(dtype, np.integer) else "a number"
    for line, row in enumerate(rows, start=1):
        for col, token in enumerate(row, start=1):
            try:
                np.array(token, dtype=dtype)
            except (ValueError, OverflowError):
                text = token.decode("latin-1")
                return DataError(f"{path}: line {line}: value {col}, {text!r}, is not {kind}")
    return None


def _row_count_error(path: pathlib.Path, rows: int, expected: int, source: str) -> DataError:
    return DataError(
        f"{path}: line {min(rows, expected) + 1}: the file has {rows} rows but {source} "
        f"has {expected}"
    )


def _parse_activity_labels(path: pathlib.Path) -> tuple[str, ...]:
    """Class names from ``activity_labels.txt`` (lines ``"<k> <NAME>"``, k = 1, 2, ...)."""
    names = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        parts = line.decode("latin-1").split(maxsplit=1)
        if len(parts) != 2 or parts[0] != str(number):
            raise DataError(
                f"{path}: line {number}: expected '{number} <activity name>', "
                f"found {line.decode('latin-1')!r}"
            )
        names.append(parts[1].strip())
    if not names:
        raise DataError(f"{path}: the file is empty")
    return tuple(names)


def _parse_split(folder: pathlib.Path, split: str, num_classes: int, steps: int | None) -> Split:
    """Parse one split of UCI HAR.

    Args:
        folder: the ``UCI HAR Dataset`` folder.
        split: ``"train"`` or ``"test"``.
        num_classes: labels in the files must be ``1 .. num_classes``.
        steps: the row length every signal file must have; None takes the first file's.

    Returns:
        The split: ``x`` ``(N, T, 9)`` in :data:`UCI_HAR_CHANNELS` order, ``y`` ``(N,)`` in
        ``0 .. num_classes - 1``, ``subjects`` ``(N,)``.
    """
    signals: list[np.ndarray] = []
    for channel in UCI_HAR_CHANNELS:
        path = folder / signal_file(channel, split)
        table = _parse_table(path, steps, np.float32)
        if signals and len(table) != len(signals[0]):
            first = signal_file(UCI_HAR_CHANNELS[0], split)
            raise _row_count_error(path, len(table), len(signals[0]), first)
        steps = table.shape[1]
        signals.append(table)
    rows = len(signals[0])
    columns = {}
    for kind in ("y", "subject"):
        path = folder / f"{split}/{kind}_{split}.txt"
        column = _parse_table(path, 1, np.int64)[:, 0]
        if len(column) != rows:
            raise _row_count_error(path, len(column), rows, "each Inertial Signals file")
        low, high = (1, num_classes) if kind == "y" else (1, np.iinfo(np.int32).max)
        outside = np.flatnonzero((column < low) | (column > high))
        if outside.size:
            line = outside[0]
            raise DataError(
                f"{path}: line {line + 1}: {column[line]} is out of range {low}..{high}"
            )
        columns[kind] = column.astype(np.int32)
    return Split(
        x=np.stack(signals, axis=-1),
        y=columns["y"] - 1,
        subjects=columns["subject"],
    )


def parse_uci_har(folder: pathlib.Path) -> tuple[Split, Split, tuple[str, ...]]:
    """Parse the text files of the ``UCI HAR Dataset`` folder: (train, test, class names)."""
    class_names = _parse_activity_labels(folder / "activity_labels.txt")
    train = _parse_split(folder, "train", len(class_names), steps=None)
    test = _parse_split(folder, "test", len(class_names), steps=train.x.shape[1])
    return train, test, class_names


# --------------------------------------------------------------------------------------------
# The cache of parsed arrays, and the entry point


def _cache_dirs(root: pathlib.Path) -> list[pathlib.Path]:
    """Where the parsed-data cache may live, in order of preference."""
    return list(dict.fromkeys([root, user_cache_dir()]))


def _cache_key(hashes: dict[str, str]) -> str:
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    for name in UCI_HAR_FILES:
        digest.update(f"\n{name}\t{hashes[name]}".encode())
    return digest.hexdigest()


def _read_cache(path: pathlib.Path, key: str) -> tuple[Split, Split, tuple[str, ...]] | None:
    """The cached (train, test, class names), or None if the file is absent, stale or corrupt."""
    try:
        with np.load(path, allow_pickle=False) as cache:
            if str(cache["key"]) != key:
                return None
            arrays = [
                (cache[f"x_{split}"], cache[f"y_{split}"], cache[f"subjects_{split}"])
                for split in SPLITS
            ]
            class_names = tuple(str(name) for name in cache["class_names"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    for x, y, subjects in arrays:
        rows = len(x)
        if not (
            x.ndim == 3
            and x.shape[2] == len(UCI_HAR_CHANNELS)
            and x.dtype == np.float32
            and y.shape == subjects.shape == (rows,)
            and y.dtype == subjects.dtype == np.int32
        ):
            return None
    train, test = (Split(x, y, subjects) for x, y, subjects in arrays)
    return train, test, class_names


def _writable(folder: pathlib.Path) -> bool:
    """Whether we may write in ``folder``: permitted, and not marked read-only by its mode bits
    (which the superuser would otherwise ignore)."""
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def _write_cache(
    root: pathlib.Path, name: str, key: str, train: Split, test: Split, class_names: tuple[str, ...]
) -> None:
    """Save the parsed arrays in the first writable cache folder; warn if there is none."""
    arrays = {"key": np.array(key), "class_names": np.array(class_names)}
    for split_name, split in zip(SPLITS, (train, test), strict=True):
        if split.subjects is None:
            raise ValueError(f"the UCI HAR {split_name} split to cache has no subject ids")
        arrays |= {
            f"x_{split_name}": split.x,
            f"y_{split_name}": split.y,
            f"subjects_{split_name}": split.subjects,
        }
    errors = []
    for folder in _cache_dirs(root):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not _writable(folder):
                errors.append(f"{folder} is read-only")
                continue
            with atomic_write(folder / name, "wb") as file:
                np.savez(file, allow_pickle=False, **arrays)
            return
        except OSError as exc:
            errors.append(f"{folder}: {exc}")
    warnings.warn(f"could not cache the parsed UCI HAR arrays ({'; '.join(errors)})", stacklevel=3)


def load_uci_har(
    data_dir: str | os.PathLike | None = None, *, download: bool = True, progress: bool = True
) -> tuple[Split, Split, tuple[str, ...]]:
    """Load the raw UCI HAR train and test splits.

    Args:
        data_dir: the folder that contains ``UCI HAR Dataset/`` (see :func:`resolve_data_dir`).
        download: download the official archive into ``data_dir`` when files are missing;
            otherwise raise :class:`DataError`.
        progress: show a progress bar while downloading.

    Returns:
        ``(train, test, class_names)``: ``x`` ``(N, 128, 9)`` float32 with the channels in
        :data:`UCI_HAR_CHANNELS` order, ``y`` ``(N,)`` int32 in ``0 .. 5`` (the files' labels
        minus 1), ``subjects`` ``(N,)`` int32; ``class_names`` from ``activity_labels.txt``.
        Train has 7352 rows from 21 subjects, test 2947 rows from 9 other subjects.

    Every file read is checked against :data:`UCI_HAR_SHA256` first (a downloaded archive is
    checked as a whole before it is unpacked, too). The parsed arrays are cached in
    ``uci_har_<key>.npz``, keyed by the file hashes, in ``data_dir`` if it is writable, else in
    :func:`user_cache_dir`; a stale or unreadable cache is ignored and rewritten.
    """
    root = resolve_data_dir(data_dir)
    folder = root / UCI_HAR_FOLDER
    missing = missing_files(folder)
    if missing and download:
        download_uci_har(root, progress)
        missing = missing_files(folder)
    if missing:
        raise DataError(
            f"UCI HAR data not found: looked in {folder}, which lacks {len(missing)} of the "
            f"{len(UCI_HAR_FILES)} files needed (first: {missing[0]}). Call "
            "load_uci_har(..., download=True) or run `python -m experiments.data --data-dir "
            f"{root}` to download it; or download {UCI_HAR_URL} and unzip it, then "
            f"'{INNER_ZIP}' inside it, into {root}; or point data_dir / $LARNN_DATA_DIR at the "
            f"folder that contains '{UCI_HAR_FOLDER}/'"
        )
    key = _cache_key(verify_files(folder))
    name = f"uci_har_{key[:16]}.npz"
    for cache_dir in _cache_dirs(root):
        cached = _read_cache(cache_dir / name, key)
        if cached is not None:
            return cached
    train, test, class_names = parse_uci_har(folder)
    _write_cache(root, name, key, train, test, class_names)
    return train, test, class_names
