"""Datasets of one's own: a ``.npz`` file of arrays, and the checks of such arrays.

The format: arrays ``X_train (N, T, C)``, ``y_train (N,)``, ``X_test``, ``y_test``, optionally
``X_val``, ``y_val`` and ``subjects_train (N,)``; load it with ``load_dataset("npz:PATH")``
(:func:`experiments.data.load_dataset`). The checks (:func:`check_inputs`, :func:`check_column`)
also serve the inputs of predictions (:mod:`experiments.prediction.inputs`).
"""

from __future__ import annotations

import pathlib
import zipfile

import numpy as np

from experiments.data.dataset import DataError, Split


def read_arrays(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file ``path``, read whole (no pickled objects).

    Raises:
        DataError: the file cannot be read as an ``.npz`` file of plain arrays.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file of plain arrays ({exc})") from exc


def check_inputs(
    path: pathlib.Path, key: str, x: np.ndarray, like: np.ndarray | None
) -> np.ndarray:
    """Check ``x`` is a finite, real ``(N, T, C)`` array with N >= 1 and (T, C) as ``like``;
    return it as float32."""
    if x.ndim != 3:
        raise DataError(f"{path}: {key} must have 3 axes (N, T, C), got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise DataError(f"{path}: {key} has dtype {x.dtype}; expected real numbers")
    if len(x) == 0:
        raise DataError(f"{path}: {key} has no rows")
    if like is not None and x.shape[1:] != like.shape[1:]:
        raise DataError(
            f"{path}: {key} has (T, C) = {x.shape[1:]}, but X_train has {like.shape[1:]}"
        )
    with np.errstate(over="ignore"):  # too large for float32: reported below as inf
        as_float32 = x.astype(np.float32)
    not_finite = np.argwhere(~np.isfinite(as_float32))
    if not_finite.size:
        index = tuple(int(i) for i in not_finite[0])
        raise DataError(
            f"{path}: {key}[{', '.join(map(str, index))}] = {x[index]} is not a finite float32"
        )
    return as_float32


def check_column(path: pathlib.Path, key: str, column: np.ndarray, rows: int, what: str) -> None:
    """Check ``column`` is a non-negative integer ``(rows,)`` array; ``what`` names its items."""
    if column.shape != (rows,):
        raise DataError(
            f"{path}: {key} has shape {column.shape}, expected ({rows},): one {what} per row"
        )
    if column.dtype.kind not in "iu":
        raise DataError(f"{path}: {key} has dtype {column.dtype}; {what}s must be integers")
    negative = np.flatnonzero(column < 0)
    if negative.size:
        index = negative[0]
        raise DataError(
            f"{path}: {key}[{index}] = {column[index]} is negative; {what}s must be integers >= 0"
        )


def load_npz(path: pathlib.Path) -> tuple[Split, Split | None, Split, int]:
    """Load and validate a dataset ``.npz`` file: (train, val or None, test, num_classes)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz file (it is not a zip archive)")
    arrays = read_arrays(path)
    for key in ("X_train", "y_train", "X_test", "y_test"):
        if key not in arrays:
            raise DataError(
                f"{path}: missing array {key!r}; expected X_train, y_train, X_test, y_test and "
                f"optionally X_val, y_val, subjects_train (found: {', '.join(arrays) or 'none'})"
            )
    if ("X_val" in arrays) != ("y_val" in arrays):
        raise DataError(f"{path}: X_val and y_val must be given together")
    splits: dict[str, Split] = {}
    for split in ("train", "val", "test"):
        if f"X_{split}" not in arrays:
            continue
        x, y = arrays[f"X_{split}"], arrays[f"y_{split}"]
        x = check_inputs(path, f"X_{split}", x, arrays["X_train"] if split != "train" else None)
        check_column(path, f"y_{split}", y, len(x), "label")
        subjects = None
        if split == "train" and "subjects_train" in arrays:
            subjects = arrays["subjects_train"]
            check_column(path, "subjects_train", subjects, len(x), "subject id")
            subjects = subjects.astype(np.int32)
        splits[split] = Split(x, y.astype(np.int32), subjects)
    num_classes = 1 + max(int(split.y.max()) for split in splits.values())
    return splits["train"], splits.get("val"), splits["test"], num_classes
