"""Datasets for sequence classification: UCI HAR and a generic ``.npz`` format.

Shapes: ``N`` windows (rows), ``T`` time steps, ``C`` channels. Inputs are ``(N, T, C)`` float32,
labels ``(N,)`` int32 in ``0 .. num_classes - 1``, subject ids ``(N,)`` int32.

UCI HAR ("Human Activity Recognition Using Smartphones", UCI ML Repository id 240): the 9 raw
inertial channels of :data:`UCI_HAR_CHANNELS` sampled at 50 Hz in windows of 128 steps, 6
activities, 7352 training windows from 21 subjects and 2947 test windows from 9 other subjects.
:func:`load_uci_har` reads the official text files (downloading them if absent), checks each file
against the SHA-256 table :data:`UCI_HAR_SHA256`, and caches the parsed arrays in a ``.npz`` file
so that later loads take a fraction of a second.

Users' own data: a ``.npz`` file with arrays ``X_train (N, T, C)``, ``y_train (N,)``,
``X_test``, ``y_test``, optionally ``X_val``, ``y_val`` and ``subjects_train (N,)``; load it with
``load_dataset("npz:PATH")``.

:func:`load_dataset` adds a validation split (whole training subjects when subject ids are known,
else a random fraction of training rows) and per-channel standardisation fitted on the training
part. Every problem with the data itself raises :class:`DataError`.

Command line: ``python -m larnn_jax.data [--data-dir DIR] [--spec SPEC]`` prints a summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pathlib
import shutil
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Sequence

import numpy as np

__all__ = [
    "UCI_HAR_CHANNELS",
    "UCI_HAR_FOLDER",
    "UCI_HAR_SHA256",
    "UCI_HAR_URL",
    "DataError",
    "Dataset",
    "Split",
    "load_dataset",
    "load_uci_har",
    "resolve_data_dir",
]

#: The official archive; it holds an inner ``UCI HAR Dataset.zip`` with the ``UCI HAR Dataset/``
#: folder.
UCI_HAR_URL = (
    "https://archive.ics.uci.edu/static/public/240/human+activity+recognition+using+smartphones.zip"
)
#: Name of the dataset folder inside the data directory.
UCI_HAR_FOLDER = "UCI HAR Dataset"
#: The channel order of the UCI HAR inputs (last axis).
UCI_HAR_CHANNELS: tuple[str, ...] = tuple(
    f"{sensor}_{axis}" for sensor in ("body_acc", "body_gyro", "total_acc") for axis in "xyz"
)
_INNER_ZIP = "UCI HAR Dataset.zip"
_SPLITS = ("train", "test")
_CACHE_FORMAT = "larnn_jax.data uci_har cache v1"

#: SHA-256 of every file the UCI HAR loader reads, as bytes on disk (the Inertial Signals files
#: have CRLF line endings), relative to ``UCI HAR Dataset/``. Each file is checked against this
#: table before it is used; replace the entries to load a copy that differs on purpose.
UCI_HAR_SHA256: dict[str, str] = {
    "activity_labels.txt": "f6e6b292704438261f0283b2a82659ab0661447dc16520938bdf379ed1bf8de0",
    "train/y_train.txt": "415b3357e2e2d5e70a45c781947c6bdd80e0410a579d862eedcd6bbce3c694ef",
    "train/subject_train.txt": "66e1e2fbe9b396fa5155f531dc3348c803f503be663e2318772d49947db9153a",
    "test/y_test.txt": "2a94cb53ca46b956c1b2aebd4a09a72badd8a8e9ea9cdfe9f31b3306a08666bb",
    "test/subject_test.txt": "63b8c577f4a85431c06bd87f6384608c90a9f72f05c7956dd21255dc63515c07",
    "train/Inertial Signals/body_acc_x_train.txt": (
        "89f7bf5e360384804439d00f463dd2f717c452c683cac6c0a09b1a191d8ce4a2"
    ),
    "train/Inertial Signals/body_acc_y_train.txt": (
        "4775a586a5a1acc6706edee08c685835daea7bc1d9274e7e7e8d660fea173944"
    ),
    "train/Inertial Signals/body_acc_z_train.txt": (
        "9155718981ff1331dcd2d30aee545905ffba71af9ece5a08d6dfdeeb7d2ec4fb"
    ),
    "train/Inertial Signals/body_gyro_x_train.txt": (
        "423f6806f09059de3c1f443cf1d04a3c3907dc7ee17b5d296ed775b07aa6cde6"
    ),
    "train/Inertial Signals/body_gyro_y_train.txt": (
        "42419d8aaefd1a319561998defb167bfa57f7e51d656b6012d5a59c0b10f5260"
    ),
    "train/Inertial Signals/body_gyro_z_train.txt": (
        "05bc629faee918b0f5b99cd2e68f860c785889627ec8efeb85c29282f3963988"
    ),
    "train/Inertial Signals/total_acc_x_train.txt": (
        "41a7fe1da7b529cc6c2c3d7df97c98752bea74d7a142673dd59c7820fad3b5e6"
    ),
    "train/Inertial Signals/total_acc_y_train.txt": (
        "03bd3a80c0c04bf354597ad62920158b4b6605e157d856a1aab9abb357d40c5d"
    ),
    "train/Inertial Signals/total_acc_z_train.txt": (
        "5be3b593f88d49bb8f740c1c41379fc928ea8608d706594ebbba81cd800a5a33"
    ),
    "test/Inertial Signals/body_acc_x_test.txt": (
        "c07eb8ee8c76eafcd94b42111082700e10f4956b769fbbb0d5413c14f38774fa"
    ),
    "test/Inertial Signals/body_acc_y_test.txt": (
        "0ed0057b41f6870b16a6953ef17f6d42bc5542fa304319fb6b7f424dd3380f0b"
    ),
    "test/Inertial Signals/body_acc_z_test.txt": (
        "a2b58317137533bdbf2342bf301ae854c15b1168259cc7b582c2dd131e3d81d5"
    ),
    "test/Inertial Signals/body_gyro_x_test.txt": (
        "fb4f27f13e4e08055043f34ed52f6d8bbe8ebce7dff9475ff92be03b3d3f607c"
    ),
    "test/Inertial Signals/body_gyro_y_test.txt": (
        "d2501166b2b1f645b51f722fcf31f3aa1e9a3edae18d49322612f37b4495cb80"
    ),
    "test/Inertial Signals/body_gyro_z_test.txt": (
        "90a18ce534be0dfc616cefdac9874e2ea599ae20421cd161361c2a33f40cfa5e"
    ),
    "test/Inertial Signals/total_acc_x_test.txt": (
        "ea71c339c828561bc1dc6f7301a54aeb7e61e6312cb2387ebaea832ffd04203d"
    ),
    "test/Inertial Signals/total_acc_y_test.txt": (
        "32692c617b40c16e020bf059a316bd6bf3a63d771f030dfc5fa4003f390b6f67"
    ),
    "test/Inertial Signals/total_acc_z_test.txt": (
        "622ddf1d9532fbe340472074ef1edd1a2f58aa332682542bb36a8c03c9ba9e04"
    ),
}


def _signal_file(channel: str, split: str) -> str:
    return f"{split}/Inertial Signals/{channel}_{split}.txt"


#: Every file the UCI HAR loader reads, relative to ``UCI HAR Dataset/``.
_UCI_HAR_FILES: tuple[str, ...] = (
    "activity_labels.txt",
    *(f"{split}/{kind}_{split}.txt" for split in _SPLITS for kind in ("y", "subject")),
    *(_signal_file(channel, split) for split in _SPLITS for channel in UCI_HAR_CHANNELS),
)


class DataError(ValueError):
    """The data is missing, corrupt or malformed; the message names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One part of a dataset.

    Attributes:
        x: inputs, ``(N, T, C)`` float32.
        y: labels, ``(N,)`` int32 in ``0 .. num_classes - 1``.
        subjects: subject id of each row, ``(N,)`` int32, or None when unknown.
    """

    x: np.ndarray
    y: np.ndarray
    subjects: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset ready for training.

    Attributes:
        train: training rows (without the validation rows).
        val: validation rows, or None when no validation split was made.
        test: test rows.
        num_classes: number of classes; labels are ``0 .. num_classes - 1``.
        class_names: ``num_classes`` names, index = label.
        name: ``"uci_har"``, or the file stem for ``npz:PATH``.
        channel_mean: per-channel mean ``(C,)`` float32 subtracted from every split, or None when
            the inputs are not standardised.
        channel_std: per-channel standard deviation ``(C,)`` float32 that every split was divided
            by (1 for a constant channel), or None when the inputs are not standardised.
    """

    train: Split
    val: Split | None
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    name: str
    channel_mean: np.ndarray | None
    channel_std: np.ndarray | None


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The data directory: ``data_dir`` if given, else ``$LARNN_DATA_DIR`` if set and non-empty,
    else the per-user cache folder :func:`user_cache_dir`.

    For UCI HAR it is the folder that contains ``UCI HAR Dataset/``.
    """
    if data_dir is None:
        data_dir = os.environ.get("LARNN_DATA_DIR") or user_cache_dir()
    return pathlib.Path(data_dir).expanduser()


def user_cache_dir() -> pathlib.Path:
    """The per-user cache folder ``pooch.os_cache("larnn_jax")`` (``~/.cache/larnn_jax`` on
    Linux, or ``$XDG_CACHE_HOME/larnn_jax``).

    pooch (the ``train`` extra) is imported here, not with this module: the library and the
    loading of data already on disk do not need it.
    """
    import pooch

    return pathlib.Path(pooch.os_cache("larnn_jax"))


# --------------------------------------------------------------------------------------------
# Parsing of the UCI HAR text files


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
    signals = []
    for channel in UCI_HAR_CHANNELS:
        path = folder / _signal_file(channel, split)
        table = _parse_table(path, steps, np.float32)
        if signals and len(table) != len(signals[0]):
            first = _signal_file(UCI_HAR_CHANNELS[0], split)
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


def _parse_uci_har(folder: pathlib.Path) -> tuple[Split, Split, tuple[str, ...]]:
    """Parse the text files of the ``UCI HAR Dataset`` folder: (train, test, class names)."""
    class_names = _parse_activity_labels(folder / "activity_labels.txt")
    train = _parse_split(folder, "train", len(class_names), steps=None)
    test = _parse_split(folder, "test", len(class_names), steps=train.x.shape[1])
    return train, test, class_names


# --------------------------------------------------------------------------------------------
# Integrity, download and cache


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_files(folder: pathlib.Path) -> dict[str, str]:
    """Check every file the loader reads against :data:`UCI_HAR_SHA256`; return the hashes."""
    hashes = {}
    for name in _UCI_HAR_FILES:
        actual = _sha256(folder / name)
        expected = UCI_HAR_SHA256[name]
        if actual != expected:
            raise DataError(
                f"{folder / name}: SHA-256 mismatch: expected {expected}, got {actual}. The file "
                f"differs from the official UCI HAR release; remove {folder} to have the loader "
                "download it again"
            )
        hashes[name] = actual
    return hashes


def _download_uci_har(root: pathlib.Path, progress: bool) -> None:
    """Download the official archive with pooch and unpack ``UCI HAR Dataset/`` into ``root``.

    The archive is fetched with 3 retries and a tqdm progress bar when ``progress`` is true; both
    zip levels (the archive and the ``UCI HAR Dataset.zip`` inside it) are unpacked and then
    removed. The archive's own hash is not pinned: integrity is checked afterwards, file by file,
    against :data:`UCI_HAR_SHA256`. When unpacking fails (a transfer cut short where HTTP could
    not tell), the archive is removed as well, so that the next call downloads it again instead
    of failing on the same file. pooch (the ``train`` extra) is imported here.
    """
    import pooch

    archive = UCI_HAR_URL.rsplit("/", 1)[1]
    fetcher = pooch.create(
        path=root,
        base_url="",
        registry={archive: None},
        urls={archive: UCI_HAR_URL},
        retry_if_failed=3,
    )
    try:
        unpacked = fetcher.fetch(
            archive,
            processor=pooch.Unzip(members=[_INNER_ZIP]),
            downloader=pooch.HTTPDownloader(progressbar=progress),
        )
        inner = [path for path in unpacked if pathlib.Path(path).name == _INNER_ZIP]
        if not inner:
            raise DataError(f"{root / archive}: the archive has no '{_INNER_ZIP}'")
        with zipfile.ZipFile(inner[0]) as zipped:
            members = [name for name in zipped.namelist() if name.startswith(f"{UCI_HAR_FOLDER}/")]
            if not members:
                raise DataError(f"{inner[0]}: no '{UCI_HAR_FOLDER}/' folder in the zip")
            zipped.extractall(root, members=members)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"could not download and unpack {UCI_HAR_URL} into {root}: {exc}. Download it by "
            f"hand and unzip it, then '{_INNER_ZIP}' inside it, into {root}"
        ) from exc
    finally:
        (root / archive).unlink(missing_ok=True)
        shutil.rmtree(root / f"{archive}.unzip", ignore_errors=True)


def _cache_dirs(root: pathlib.Path) -> list[pathlib.Path]:
    """Where the parsed-data cache may live, in order of preference."""
    return list(dict.fromkeys([root, user_cache_dir()]))


def _cache_key(hashes: dict[str, str]) -> str:
    digest = hashlib.sha256(_CACHE_FORMAT.encode())
    for name in _UCI_HAR_FILES:
        digest.update(f"\n{name}\t{hashes[name]}".encode())
    return digest.hexdigest()


def _read_cache(path: pathlib.Path, key: str) -> tuple[Split, Split, tuple[str, ...]] | None:
    """The cached (train, test, class names), or None if the file is absent, stale or corrupt."""
    try:
        with np.load(path, allow_pickle=False) as cache:
            if str(cache["key"]) != key:
                return None
            splits = [
                Split(cache[f"x_{split}"], cache[f"y_{split}"], cache[f"subjects_{split}"])
                for split in _SPLITS
            ]
            class_names = tuple(str(name) for name in cache["class_names"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    for split in splits:
        rows = len(split.x)
        if not (
            split.x.ndim == 3
            and split.x.shape[2] == len(UCI_HAR_CHANNELS)
            and split.x.dtype == np.float32
            and split.y.shape == split.subjects.shape == (rows,)
            and split.y.dtype == split.subjects.dtype == np.int32
        ):
            return None
    train, test = splits
    return train, test, class_names


def _writable(folder: pathlib.Path) -> bool:
    """Whether we may write in ``folder``: permitted, and not marked read-only by its mode bits
    (which the superuser would otherwise ignore)."""
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def _save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically (through a temporary file in the same folder)."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as file:
            np.savez(file, **arrays)
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


def _write_cache(
    root: pathlib.Path, name: str, key: str, train: Split, test: Split, class_names: tuple[str, ...]
) -> None:
    """Save the parsed arrays in the first writable cache folder; warn if there is none."""
    arrays = {"key": np.array(key), "class_names": np.array(class_names)}
    for split_name, split in zip(_SPLITS, (train, test), strict=True):
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
            _save_npz(folder / name, arrays)
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

    Every file read is checked against :data:`UCI_HAR_SHA256` first (the downloaded archive has
    no pinned hash: this table is the integrity check). The parsed arrays are cached in
    ``uci_har_<key>.npz``, keyed by the file hashes, in ``data_dir`` if it is writable, else in
    :func:`user_cache_dir`; a stale or unreadable cache is ignored and rewritten.
    """
    root = resolve_data_dir(data_dir)
    folder = root / UCI_HAR_FOLDER
    missing = [name for name in _UCI_HAR_FILES if not (folder / name).is_file()]
    if missing and download:
        _download_uci_har(root, progress)
        missing = [name for name in _UCI_HAR_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"UCI HAR data not found: looked in {folder}, which lacks {len(missing)} of the "
            f"{len(_UCI_HAR_FILES)} files needed (first: {missing[0]}). Call "
            "load_uci_har(..., download=True) or run `python -m larnn_jax.data --data-dir "
            f"{root}` to download it; or download {UCI_HAR_URL} and unzip it, then "
            f"'{_INNER_ZIP}' inside it, into {root}; or point data_dir / $LARNN_DATA_DIR at the "
            f"folder that contains '{UCI_HAR_FOLDER}/'"
        )
    key = _cache_key(_verify_files(folder))
    name = f"uci_har_{key[:16]}.npz"
    for cache_dir in _cache_dirs(root):
        cached = _read_cache(cache_dir / name, key)
        if cached is not None:
            return cached
    train, test, class_names = _parse_uci_har(folder)
    _write_cache(root, name, key, train, test, class_names)
    return train, test, class_names


# --------------------------------------------------------------------------------------------
# The generic .npz format


def _check_inputs(
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


def _check_column(path: pathlib.Path, key: str, column: np.ndarray, rows: int, what: str) -> None:
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


def _load_npz(path: pathlib.Path) -> tuple[Split, Split | None, Split, int]:
    """Load and validate a dataset ``.npz`` file: (train, val or None, test, num_classes)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz file (it is not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file of plain arrays ({exc})") from exc
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
        x = _check_inputs(path, f"X_{split}", x, arrays["X_train"] if split != "train" else None)
        _check_column(path, f"y_{split}", y, len(x), "label")
        subjects = None
        if split == "train" and "subjects_train" in arrays:
            subjects = arrays["subjects_train"]
            _check_column(path, "subjects_train", subjects, len(x), "subject id")
            subjects = subjects.astype(np.int32)
        splits[split] = Split(x, y.astype(np.int32), subjects)
    num_classes = 1 + max(int(split.y.max()) for split in splits.values())
    return splits["train"], splits.get("val"), splits["test"], num_classes


# --------------------------------------------------------------------------------------------
# Validation split, standardisation, the public entry point


def _select(split: Split, mask: np.ndarray) -> Split:
    return Split(
        split.x[mask], split.y[mask], None if split.subjects is None else split.subjects[mask]
    )


def _split_by_subject(split: Split, count: int, rng: np.random.Generator) -> tuple[Split, Split]:
    """Hold out ``count`` whole subjects, drawn by ``rng``: (rest, held out)."""
    subjects = np.unique(split.subjects)
    if count >= len(subjects):
        raise ValueError(
            f"validation_subjects={count}, but the training data has only {len(subjects)} subjects"
        )
    held_out = rng.choice(subjects, size=count, replace=False)
    mask = np.isin(split.subjects, held_out)
    return _select(split, ~mask), _select(split, mask)


def _split_by_fraction(
    split: Split, fraction: float, rng: np.random.Generator
) -> tuple[Split, Split]:
    """Hold out ``round(fraction * N)`` rows drawn by ``rng``, order kept: (rest, held out)."""
    rows = len(split.y)
    count = round(fraction * rows)
    if not 0 < count < rows:
        raise ValueError(
            f"validation_fraction={fraction} of {rows} training rows leaves an empty split"
        )
    mask = np.zeros(rows, dtype=bool)
    mask[rng.permutation(rows)[:count]] = True
    return _select(split, ~mask), _select(split, mask)


def load_dataset(
    spec: str = "uci_har",
    data_dir: str | os.PathLike | None = None,
    *,
    validation_subjects: int = 4,
    validation_fraction: float = 0.2,
    standardize: bool = True,
    seed: int = 0,
) -> Dataset:
    """Load a dataset, split off validation data and standardise it.

    Args:
        spec: ``"uci_har"`` (see :func:`load_uci_har`; downloaded if absent) or ``"npz:PATH"``
            (see the module docstring; PATH relative to the working directory).
        data_dir: for ``"uci_har"``, the folder that contains ``UCI HAR Dataset/``.
        validation_subjects: when the training rows have subject ids, the number of whole
            training subjects held out for validation, drawn by ``np.random.default_rng(seed)``;
            0 for no validation split. Test subjects are never used.
        validation_fraction: when there are no subject ids, the fraction of training rows held
            out for validation, drawn by ``np.random.default_rng(seed)``; 0 for no validation
            split.
        standardize: subtract the per-channel mean and divide by the per-channel standard
            deviation, both over the training rows (after the validation rows are removed) and
            all time steps, from every split.
        seed: seed of the validation draw.

    An ``.npz`` file's own ``X_val``/``y_val`` are used as they are, without further split.

    Returns:
        The :class:`Dataset`.
    """
    if validation_subjects < 0:
        raise ValueError(f"validation_subjects must be >= 0, got {validation_subjects}")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if spec == "uci_har":
        train, test, class_names = load_uci_har(data_dir)
        val, name = None, "uci_har"
    elif spec.startswith("npz:"):
        path = pathlib.Path(spec.removeprefix("npz:")).expanduser()
        train, val, test, num_classes = _load_npz(path)
        class_names = tuple(str(label) for label in range(num_classes))
        name = path.stem
    else:
        raise ValueError(f"unknown dataset spec {spec!r}; expected 'uci_har' or 'npz:PATH'")

    rng = np.random.default_rng(seed)
    if val is None and train.subjects is not None and validation_subjects > 0:
        train, val = _split_by_subject(train, validation_subjects, rng)
    elif val is None and train.subjects is None and validation_fraction > 0:
        train, val = _split_by_fraction(train, validation_fraction, rng)

    mean = std = None
    if standardize:
        mean = train.x.mean(axis=(0, 1), dtype=np.float64).astype(np.float32)
        std = train.x.std(axis=(0, 1), dtype=np.float64).astype(np.float32)
        std[std == 0] = 1.0

        def scale(split: Split) -> Split:
            return dataclasses.replace(split, x=(split.x - mean) / std)

        train, test = scale(train), scale(test)
        val = None if val is None else scale(val)
    return Dataset(
        train=train,
        val=val,
        test=test,
        num_classes=len(class_names),
        class_names=class_names,
        name=name,
        channel_mean=mean,
        channel_std=std,
    )


# --------------------------------------------------------------------------------------------
# Command line


def _summary(dataset: Dataset) -> str:
    """A human-readable description: shapes, class counts and subjects of every split."""
    _, steps, channels = dataset.train.x.shape
    lines = [
        f"dataset {dataset.name}: {dataset.num_classes} classes, {steps} steps x "
        f"{channels} channels"
    ]
    for label, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)):
        if split is None:
            lines.append(f"{label:>5}: none")
            continue
        counts = np.bincount(split.y, minlength=dataset.num_classes)
        lines.append(f"{label:>5}: x {split.x.shape}, y {split.y.shape}")
        lines.append(
            "       classes: "
            + ", ".join(f"{n} {c}" for n, c in zip(dataset.class_names, counts, strict=True))
        )
        if split.subjects is not None:
            subjects = np.unique(split.subjects)
            lines.append(f"       {len(subjects)} subjects: {' '.join(map(str, subjects))}")
    if dataset.channel_mean is not None:
        with np.printoptions(precision=4, suppress=True):
            lines.append(f"standardised with train mean {dataset.channel_mean}")
            lines.append(f"                      and std {dataset.channel_std}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: load a dataset and print its summary; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m larnn_jax.data",
        description="Load a dataset (downloading UCI HAR if absent) and print a summary.",
    )
    parser.add_argument("--spec", default="uci_har", help="'uci_har' (default) or 'npz:PATH'")
    parser.add_argument(
        "--data-dir",
        help="folder that contains 'UCI HAR Dataset/' (default: $LARNN_DATA_DIR, else "
        f"{user_cache_dir()})",
    )
    parser.add_argument("--validation-subjects", type=int, default=4)
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        dataset = load_dataset(
            args.spec,
            args.data_dir,
            validation_subjects=args.validation_subjects,
            validation_fraction=args.validation_fraction,
            seed=args.seed,
        )
    except ValueError as exc:  # DataError included
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.spec == "uci_har":
        print(f"data dir: {resolve_data_dir(args.data_dir)}")
    print(_summary(dataset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
