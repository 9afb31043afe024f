"""Datasets of one's own: a ``.npz`` file of arrays, and the checks of such arrays.

The format: arrays ``X_train (N, T, C)``, ``y_train (N,)``, ``X_test``, ``y_test``, optionally
``X_val``, ``y_val``, ``subjects_train (N,)`` and ``class_names (K,)`` (strings); labels are
``0 .. K - 1``, K the number of class names, else the largest label + 1 with no label missing
below it. Load it with ``load_dataset("npz:PATH")``
(:func:`experiments.data.load_dataset`). The checks (:func:`check_inputs`, :func:`check_column`)
also serve the inputs of predictions (:mod:`experiments.prediction.inputs`).
"""

from __future__ import annotations

import logging
import pathlib
import zipfile

import numpy as np

from experiments.data.dataset import DataError, Split

log = logging.getLogger(__name__)


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


def load_npz(path: pathlib.Path) -> tuple[Split, Split | None, Split, tuple[str, ...]]:
    """Load and validate a dataset ``.npz`` file: (train, val or None, test, class names)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz file (it is not a zip archive)")
    arrays = read_arrays(path)
    for key in ("X_train", "y_train", "X_test", "y_test"):
        if key not in arrays:
            raise DataError(
                f"{path}: missing array {key!r}; expected X_train, y_train, X_test, y_test and "
                "optionally X_val, y_val, subjects_train, class_names (found: "
                f"{', '.join(arrays) or 'none'})"
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
    labels = {f"y_{split}": splits[split].y for split in splits}
    if "class_names" in arrays:
        class_names = check_class_names(path, arrays["class_names"], labels)
    else:
        class_names = tuple(map(str, range(1 + max(int(y.max()) for y in labels.values()))))
        check_no_gaps(path, labels)
    warn_of_untrained_classes(path, class_names, labels)
    return splits["train"], splits.get("val"), splits["test"], class_names


def check_class_names(
    path: pathlib.Path, names: np.ndarray, labels: dict[str, np.ndarray]
) -> tuple[str, ...]:
    """The ``class_names`` array ``(C,)`` of strings as a tuple, after checking that every
    label of ``labels`` (array name → labels) is in ``0 .. C - 1``."""
    if names.ndim != 1 or names.dtype.kind != "U" or len(names) == 0:
        raise DataError(
            f"{path}: class_names must be a 1-D array of strings, one per class; got dtype "
            f"{names.dtype}, shape {names.shape}"
        )
    if len(set(names.tolist())) != len(names):
        raise DataError(f"{path}: class_names has a name twice: {names.tolist()}")
    for key, y in labels.items():
        outside = np.flatnonzero(y >= len(names))
        if outside.size:
            index = outside[0]
            raise DataError(
                f"{path}: {key}[{index}] = {y[index]} is not a class: class_names names "
                f"{len(names)} classes, labels 0..{len(names) - 1}"
            )
    return tuple(names.tolist())


def check_no_gaps(path: pathlib.Path, labels: dict[str, np.ndarray]) -> None:
    """Without class names, the labels number the classes: every label from 0 to the largest
    must occur in ``labels`` (array name → labels), else the first label above a gap (a typo,
    such as 1000 among 0..5, which would make a model of 1001 classes) is an error."""
    present = np.unique(np.concatenate(list(labels.values())))
    gaps = np.setdiff1d(np.arange(present[-1] + 1), present)
    if not gaps.size:
        return
    gap = int(gaps[0])
    above = int(present[np.searchsorted(present, gap)])
    missing = f"{gap}" if above == gap + 1 else f"in {gap}..{above - 1}"
    key, y = next((key, y) for key, y in labels.items() if (y == above).any())
    index = int(np.flatnonzero(y == above)[0])
    raise DataError(
        f"{path}: {key}[{index}] = {above}, but no row has a label {missing}: labels must "
        "number the classes 0..C-1 without gaps (a typo?), or class_names must name all C "
        "classes"
    )


def warn_of_untrained_classes(
    path: pathlib.Path, class_names: tuple[str, ...], labels: dict[str, np.ndarray]
) -> None:
    """Logs a warning naming the classes without a row in ``y_train``: the model cannot learn
    them (each named with the arrays it does occur in, if any)."""
    trained = set(np.unique(labels["y_train"]).tolist())
    untrained = []
    for label, name in enumerate(class_names):
        if label in trained:
            continue
        elsewhere = [key for key, y in labels.items() if (y == label).any()]
        where = f"only in {', '.join(elsewhere)}" if elsewhere else "in no array"
        shown = f"{label}" if name == str(label) else f"{label} ({name!r})"
        untrained.append(f"{shown}, {where}")
    if untrained:
        log.warning(
            "%s: no training row of class %s: the model cannot learn %s",
            path,
            "; ".join(untrained),
            "it" if len(untrained) == 1 else "them",
        )
