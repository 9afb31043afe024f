"""Tests of experiments.data on tiny synthetic datasets (official UCI HAR layout and .npz) and, when
present, on the real UCI HAR copy."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import types
import urllib.parse
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pooch
import pytest
import requests
import tqdm
from archive_server import ArchiveServer, Reply, cut_short, serve

from experiments import data
from experiments.data import DataError, Split, download, uci_har
from experiments.data import __main__ as data_cli

CLASS_NAMES = (
    "WALKING",
    "WALKING_UPSTAIRS",
    "WALKING_DOWNSTAIRS",
    "SITTING",
    "STANDING",
    "LAYING",
)
STEPS = 8
ROWS_PER_SUBJECT = 3
TRAIN_SUBJECTS = (1, 3, 5, 6, 7, 8)
TEST_SUBJECTS = (2, 4)

Lines = list[str]


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the user cache folder inside tmp_path and forbid downloads from anywhere but
    127.0.0.1 (the tests' own HTTP server), reached directly whatever proxy is configured."""
    real_get = requests.get

    def local_get(url: str, *args: object, **kwargs: object) -> requests.Response:
        if urllib.parse.urlsplit(url).hostname != "127.0.0.1":
            raise AssertionError(f"a test tried to download {url}")
        return real_get(url, *args, **kwargs)

    monkeypatch.setattr(pooch, "os_cache", lambda project: tmp_path / "user-cache" / project)
    monkeypatch.setattr(requests, "get", local_get)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("LARNN_DATA_DIR", raising=False)


def matlab_format(value: float) -> str:
    """``value`` as MATLAB's ``%16.7e`` writes it: 3-digit exponent, right-aligned in 16."""
    mantissa, exponent = f"{value:.7e}".split("e")
    return f"{mantissa}e{int(exponent):+04d}".rjust(16)


def make_uci_har(root: Path, seed: int = 0) -> dict[str, Split]:
    """Write a tiny UCI HAR in the official layout under ``root``; return the expected splits.

    Channel ``c`` has values near ``10 c`` (so a channel mix-up shows), shifted per subject.
    Train: 6 subjects x 3 rows, test: 2 other subjects x 3 rows, 8 steps, labels cycling 1..6.
    """
    rng = np.random.default_rng(seed)
    folder = root / data.UCI_HAR_FOLDER
    folder.mkdir(parents=True)
    labels_text = "".join(f"{k} {name}\n" for k, name in enumerate(CLASS_NAMES, start=1))
    (folder / "activity_labels.txt").write_text(labels_text)
    expected = {}
    for split, subject_ids in (("train", TRAIN_SUBJECTS), ("test", TEST_SUBJECTS)):
        subjects = np.repeat(subject_ids, ROWS_PER_SUBJECT)
        rows = len(subjects)
        labels = np.arange(rows) % len(CLASS_NAMES)
        values = (
            rng.normal(size=(rows, STEPS, 9)) + 10.0 * np.arange(9) + 0.5 * subjects[:, None, None]
        )
        text = np.vectorize(matlab_format)(values)
        signals = folder / split / "Inertial Signals"
        signals.mkdir(parents=True)
        for c, channel in enumerate(data.UCI_HAR_CHANNELS):
            lines = ("".join(row) + "\r\n" for row in text[:, :, c])
            (signals / f"{channel}_{split}.txt").write_bytes("".join(lines).encode())
        (folder / split / f"y_{split}.txt").write_text("".join(f"{k + 1}\n" for k in labels))
        (folder / split / f"subject_{split}.txt").write_text("".join(f"{s}\n" for s in subjects))
        expected[split] = Split(
            x=text.astype(np.float64).astype(np.float32),
            y=labels.astype(np.int32),
            subjects=subjects.astype(np.int32),
        )
    return expected


def register_hashes(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make the loader's SHA-256 table describe the files now under ``root``."""
    folder = root / data.UCI_HAR_FOLDER
    table = {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in download.UCI_HAR_SHA256
    }
    monkeypatch.setattr(download, "UCI_HAR_SHA256", table)


@pytest.fixture
def uci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, Split]]:
    """A synthetic UCI HAR under tmp_path/data with its hashes registered: (root, expected)."""
    root = tmp_path / "data"
    expected = make_uci_har(root)
    register_hashes(monkeypatch, root)
    return root, expected


def assert_split_equal(actual: Split, expected: Split) -> None:
    assert actual.x.dtype == np.float32 and actual.y.dtype == np.int32
    np.testing.assert_array_equal(actual.x, expected.x)
    np.testing.assert_array_equal(actual.y, expected.y)
    if expected.subjects is None:
        assert actual.subjects is None
    else:
        assert actual.subjects.dtype == np.int32
        np.testing.assert_array_equal(actual.subjects, expected.subjects)


def rewrite(path: Path, mutate: Callable[[Lines], Lines]) -> None:
    """Rewrite a text file line by line, keeping its line endings."""
    raw = path.read_bytes().decode()
    eol = "\r\n" if "\r\n" in raw else "\n"
    lines = mutate(raw.split(eol)[:-1])
    path.write_bytes("".join(line + eol for line in lines).encode())


def set_line(number: int, text: str) -> Callable[[Lines], Lines]:
    return lambda lines: [text if i == number else line for i, line in enumerate(lines, 1)]


def set_value(number: int, column: int, token: str) -> Callable[[Lines], Lines]:
    def mutate(lines: Lines) -> Lines:
        tokens = lines[number - 1].split()
        tokens[column - 1] = token
        return set_line(number, " ".join(tokens))(lines)

    return mutate


def drop_value(number: int) -> Callable[[Lines], Lines]:
    return lambda lines: set_line(number, lines[number - 1][:-16])(lines)


def add_value(number: int) -> Callable[[Lines], Lines]:
    return lambda lines: set_line(number, lines[number - 1] + lines[number - 1][-16:])(lines)


def drop_last_line(lines: Lines) -> Lines:
    return lines[:-1]


def shorten_all_rows(lines: Lines) -> Lines:
    return [line[: 6 * 16] for line in lines]


# --------------------------------------------------------------------------------------------
# UCI HAR loader


def test_matlab_format_matches_the_official_files() -> None:
    assert matlab_format(1.808515e-4) == "  1.8085150e-004"
    assert matlab_format(-0.170999) == " -1.7099900e-001"


def test_hash_table_covers_every_file_read() -> None:
    assert len(download.UCI_HAR_SHA256) == 23
    assert set(download.UCI_HAR_SHA256) == set(download.UCI_HAR_FILES)
    assert all(re.fullmatch("[0-9a-f]{64}", h) for h in download.UCI_HAR_SHA256.values())


def test_load_uci_har_shapes_labels_and_channel_order(uci) -> None:
    root, expected = uci
    train, test, class_names = data.load_uci_har(root, download=False)
    assert class_names == CLASS_NAMES
    assert train.x.shape == (18, STEPS, 9) and test.x.shape == (6, STEPS, 9)
    assert_split_equal(train, expected["train"])
    assert_split_equal(test, expected["test"])
    # files hold labels 1..6 -> 0..5
    np.testing.assert_array_equal(train.y[:7], [0, 1, 2, 3, 4, 5, 0])
    # channel c of the files is x[..., c]: body_acc xyz, body_gyro xyz, total_acc xyz
    channel_means = train.x.mean(axis=(0, 1)) - 0.5 * np.mean(TRAIN_SUBJECTS)
    np.testing.assert_allclose(channel_means, 10.0 * np.arange(9), atol=0.5)
    first_gyro_y = (
        root / data.UCI_HAR_FOLDER / download.signal_file("body_gyro_y", "train")
    ).read_text()
    assert train.x[0, 0, 4] == np.float32(first_gyro_y.split()[0])


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert data.resolve_data_dir() == tmp_path / "user-cache" / "larnn_jax"
    monkeypatch.setenv("LARNN_DATA_DIR", str(tmp_path / "env"))
    assert data.resolve_data_dir() == tmp_path / "env"
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data.resolve_data_dir("~/x") == Path.home() / "x"


def test_absent_data_without_download(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    with pytest.raises(DataError) as info:
        data.load_uci_har(root, download=False)
    message = str(info.value)
    assert f"looked in {root / 'UCI HAR Dataset'}" in message
    assert "lacks 23 of the 23 files needed (first: activity_labels.txt)" in message
    assert "download=True" in message and download.UCI_HAR_URL in message


def test_hash_mismatch_names_file_and_both_hashes(uci) -> None:
    root, _ = uci
    path = root / data.UCI_HAR_FOLDER / download.signal_file("body_acc_x", "train")
    expected_hash = download.UCI_HAR_SHA256[download.signal_file("body_acc_x", "train")]
    rewrite(path, set_value(2, 3, matlab_format(0.25)))
    actual_hash = hashlib.sha256(path.read_bytes()).hexdigest()
    pattern = (
        rf"body_acc_x_train\.txt: SHA-256 mismatch: expected {expected_hash}, got {actual_hash}"
    )
    with pytest.raises(DataError, match=pattern):
        data.load_uci_har(root, download=False)


SIGNAL_TRAIN = "train/Inertial Signals/body_gyro_y_train.txt"
BAD_FILES = [
    pytest.param(
        SIGNAL_TRAIN,
        drop_value(3),
        r"body_gyro_y_train\.txt: line 3: expected 8 values, found 7",
        id="too-few-values",
    ),
    pytest.param(
        SIGNAL_TRAIN,
        add_value(5),
        r"body_gyro_y_train\.txt: line 5: expected 8 values, found 9",
        id="too-many-values",
    ),
    pytest.param(
        SIGNAL_TRAIN,
        set_line(4, ""),
        r"body_gyro_y_train\.txt: line 4: expected 8 values, found 0",
        id="empty-line",
    ),
    pytest.param(
        "test/Inertial Signals/body_acc_z_test.txt",
        set_value(2, 4, "1.2e-00x"),
        r"body_acc_z_test\.txt: line 2: value 4, '1\.2e-00x', is not a number",
        id="not-a-number",
    ),
    pytest.param(
        "train/Inertial Signals/total_acc_x_train.txt",
        set_value(6, 1, "NaN"),
        r"total_acc_x_train\.txt: line 6: value 1, 'NaN', is NaN or infinite",
        id="nan",
    ),
    pytest.param(
        "train/Inertial Signals/total_acc_x_train.txt",
        set_value(1, 8, "-Inf"),
        r"total_acc_x_train\.txt: line 1: value 8, '-Inf', is NaN or infinite",
        id="inf",
    ),
    pytest.param(
        "train/Inertial Signals/total_acc_x_train.txt",
        set_value(9, 2, "1e+999"),
        r"total_acc_x_train\.txt: line 9: value 2, '1e\+999', is NaN or infinite",
        id="overflow",
    ),
    pytest.param(
        "test/Inertial Signals/total_acc_z_test.txt",
        drop_last_line,
        r"total_acc_z_test\.txt: line 6: the file has 5 rows but "
        r"test/Inertial Signals/body_acc_x_test\.txt has 6",
        id="signal-row-count",
    ),
    pytest.param(
        "train/Inertial Signals/body_acc_y_train.txt",
        shorten_all_rows,
        r"body_acc_y_train\.txt: line 1: expected 8 values, found 6",
        id="signal-row-length",
    ),
    pytest.param(
        "test/Inertial Signals/body_acc_x_test.txt",
        shorten_all_rows,
        r"body_acc_x_test\.txt: line 1: expected 8 values, found 6",
        id="test-row-length-differs-from-train",
    ),
    pytest.param(
        "train/y_train.txt",
        drop_last_line,
        r"y_train\.txt: line 18: the file has 17 rows but each Inertial Signals file has 18",
        id="label-row-count",
    ),
    pytest.param(
        "train/y_train.txt",
        set_line(5, "7"),
        r"y_train\.txt: line 5: 7 is out of range 1\.\.6",
        id="label-too-large",
    ),
    pytest.param(
        "test/y_test.txt",
        set_line(2, "0"),
        r"y_test\.txt: line 2: 0 is out of range 1\.\.6",
        id="label-zero",
    ),
    pytest.param(
        "train/y_train.txt",
        set_line(4, "2.5"),
        r"y_train\.txt: line 4: value 1, '2\.5', is not an integer",
        id="label-not-integer",
    ),
    pytest.param(
        "train/y_train.txt",
        set_line(3, "2 3"),
        r"y_train\.txt: line 3: expected 1 value, found 2",
        id="two-labels-on-a-line",
    ),
    pytest.param(
        "test/subject_test.txt",
        lambda lines: [*lines, "4"],
        r"subject_test\.txt: line 7: the file has 7 rows but each Inertial Signals file has 6",
        id="subject-row-count",
    ),
    pytest.param(
        "test/y_test.txt",
        lambda lines: [],
        r"y_test\.txt: the file is empty",
        id="empty-file",
    ),
    pytest.param(
        "activity_labels.txt",
        set_line(3, "3"),
        r"activity_labels\.txt: line 3: expected '3 <activity name>', found '3'",
        id="activity-labels",
    ),
]


@pytest.mark.parametrize(("name", "mutate", "pattern"), BAD_FILES)
def test_malformed_files_are_reported_with_file_and_line(
    uci, monkeypatch: pytest.MonkeyPatch, name: str, mutate, pattern: str
) -> None:
    root, _ = uci
    rewrite(root / data.UCI_HAR_FOLDER / name, mutate)
    register_hashes(monkeypatch, root)
    with pytest.raises(DataError, match=pattern):
        data.load_uci_har(root, download=False)


# --------------------------------------------------------------------------------------------
# Parsed-data cache


def forbid_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(folder: Path) -> None:
        raise AssertionError("parsed the text files again")

    monkeypatch.setattr(uci_har, "parse_uci_har", fail)


def test_second_load_uses_the_cache(uci, monkeypatch: pytest.MonkeyPatch) -> None:
    root, expected = uci
    first = data.load_uci_har(root, download=False)
    caches = list(root.glob("uci_har_*.npz"))
    assert len(caches) == 1
    forbid_parsing(monkeypatch)
    train, test, class_names = data.load_uci_har(root, download=False)
    assert class_names == first[2] == CLASS_NAMES
    assert_split_equal(train, expected["train"])
    assert_split_equal(test, expected["test"])


def corrupt_bytes(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def wrong_key(path: Path) -> None:
    with np.load(path) as cache:
        arrays = dict(cache)
    np.savez(path, **(arrays | {"key": np.array("0" * 64), "y_train": arrays["y_train"] + 1}))


@pytest.mark.parametrize("spoil", [corrupt_bytes, wrong_key])
def test_broken_or_stale_cache_is_rebuilt(
    uci, monkeypatch: pytest.MonkeyPatch, spoil: Callable[[Path], None]
) -> None:
    root, expected = uci
    data.load_uci_har(root, download=False)
    (cache,) = root.glob("uci_har_*.npz")
    spoil(cache)
    train, _, _ = data.load_uci_har(root, download=False)
    assert_split_equal(train, expected["train"])
    forbid_parsing(monkeypatch)
    train, _, _ = data.load_uci_har(root, download=False)  # the rewritten cache is good
    assert_split_equal(train, expected["train"])


def test_cache_is_keyed_by_file_hashes(uci, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = uci
    data.load_uci_har(root, download=False)
    rewrite(root / data.UCI_HAR_FOLDER / "train/y_train.txt", set_line(1, "6"))
    register_hashes(monkeypatch, root)
    train, _, _ = data.load_uci_har(root, download=False)
    assert train.y[0] == 5
    assert len(list(root.glob("uci_har_*.npz"))) == 2


def test_cache_goes_to_user_cache_when_data_dir_is_read_only(
    uci, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, expected = uci
    root.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        data.load_uci_har(root, download=False)
        assert list(root.glob("*.npz")) == []
        assert len(list((tmp_path / "user-cache" / "larnn_jax").glob("uci_har_*.npz"))) == 1
        forbid_parsing(monkeypatch)
        train, _, _ = data.load_uci_har(root, download=False)
        assert_split_equal(train, expected["train"])
    finally:
        root.chmod(stat.S_IRWXU)


# --------------------------------------------------------------------------------------------
# Download, over real HTTP from a server on 127.0.0.1 (archive_server.py)

ARCHIVE_PATH = "/" + download.UCI_HAR_URL.rsplit("/", 1)[1]


def zip_official_archive(source: Path, tmp_path: Path) -> bytes:
    """The ``UCI HAR Dataset/`` folder under ``source`` zipped like the official archive (a zip
    inside a zip, with macOS resource forks that must not be unpacked); returns its bytes."""
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w") as archive:
        for path in sorted((source / data.UCI_HAR_FOLDER).rglob("*")):
            archive.write(path, path.relative_to(source).as_posix())
        archive.writestr("__MACOSX/UCI HAR Dataset/._README.txt", b"resource fork")
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w") as archive:
        archive.write(inner, "UCI HAR Dataset.zip")
        archive.writestr("UCI HAR Dataset.names", "description")
    return outer.getvalue()


@pytest.fixture
def archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, dict[str, Split]]:
    """A synthetic dataset as the official archive, its hashes registered: (bytes, expected)."""
    expected = make_uci_har(tmp_path / "source")
    register_hashes(monkeypatch, tmp_path / "source")
    body = zip_official_archive(tmp_path / "source", tmp_path)
    register_archive_hash(monkeypatch, body)
    return body, expected


def register_archive_hash(monkeypatch: pytest.MonkeyPatch, body: bytes) -> None:
    """Make the loader's pinned archive hash describe ``body``."""
    monkeypatch.setattr(download, "UCI_HAR_ARCHIVE_SHA256", hashlib.sha256(body).hexdigest())


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ArchiveServer]:
    """An HTTP server on 127.0.0.1 where the loader's URL now points; it answers 404 until the
    test gives it replies."""
    with serve() as running:
        monkeypatch.setattr(download, "UCI_HAR_URL", running.url(ARCHIVE_PATH))
        yield running


@pytest.fixture
def retry_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits pooch makes between attempts, recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(pooch.core, "time", types.SimpleNamespace(sleep=waits.append))
    return waits


def assert_downloaded(root: Path, expected: dict[str, Split]) -> None:
    """``root`` holds the unpacked dataset and its cache only, with the expected contents."""
    train, test, class_names = data.load_uci_har(root, download=False)
    assert class_names == CLASS_NAMES
    assert_split_equal(train, expected["train"])
    assert_split_equal(test, expected["test"])
    names = sorted(path.name for path in root.iterdir())
    assert names[0] == "UCI HAR Dataset" and re.fullmatch(r"uci_har_[0-9a-f]{16}\.npz", names[1])
    assert len(names) == 2  # the archives are removed, __MACOSX is not unpacked


def test_download_unpacks_both_zip_levels_and_shows_progress(
    archive, server: ArchiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body, expected = archive
    server.replies = [Reply(body=body)]
    root = tmp_path / "downloaded"
    data.load_uci_har(root)
    assert server.requests == [ARCHIVE_PATH]
    size = tqdm.tqdm.format_sizeof(len(body))  # tqdm's unit_scale display, e.g. 33.5k
    bar = capsys.readouterr().err.split("\r")[-1]  # the bar's final state
    assert bar.startswith("100%|") and f"| {size}/{size} [" in bar, bar
    assert_downloaded(root, expected)
    data.load_uci_har(root)  # now present: no second download
    assert server.requests == [ARCHIVE_PATH]


def test_failed_and_cut_short_transfers_are_retried(
    archive, server: ArchiveServer, tmp_path: Path, retry_waits: list[float]
) -> None:
    """A server error, then a transfer shorter than its Content-Length, then the archive."""
    body, expected = archive
    server.replies = [Reply(status=503), cut_short(body, len(body) // 2), Reply(body=body)]
    root = tmp_path / "downloaded"
    data.load_uci_har(root, progress=False)
    assert server.requests == [ARCHIVE_PATH] * 3
    assert retry_waits == [1, 2]
    assert_downloaded(root, expected)


def test_download_that_keeps_failing_is_reported(
    server: ArchiveServer, tmp_path: Path, retry_waits: list[float]
) -> None:
    server.replies = [Reply(status=503)]
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        data.load_uci_har(root)
    assert str(info.value) == (
        f"could not download and unpack {download.UCI_HAR_URL} into {root}: 503 Server Error: "
        f"Service Unavailable for url: {download.UCI_HAR_URL}. Download it by hand and unzip it, "
        f"then 'UCI HAR Dataset.zip' inside it, into {root}"
    )
    assert server.requests == [ARCHIVE_PATH] * 4  # 3 retries
    assert retry_waits == [1, 2, 3]
    assert list(root.iterdir()) == []


def test_archive_cut_short_fails_its_hash_and_is_downloaded_again(
    archive, server: ArchiveServer, tmp_path: Path, retry_waits: list[float]
) -> None:
    """Without a Content-Length, HTTP cannot tell a transfer was cut short: the archive's hash
    does, before anything is unpacked, and the download is tried again."""
    body, expected = archive
    server.replies = [cut_short(body, len(body) // 2, declared=False), Reply(body=body)]
    root = tmp_path / "downloaded"
    data.load_uci_har(root, progress=False)
    assert server.requests == [ARCHIVE_PATH] * 2
    assert retry_waits == [1]
    assert_downloaded(root, expected)


def test_an_archive_that_is_not_the_official_one_is_refused_before_unpacking(
    archive, server: ArchiveServer, tmp_path: Path, retry_waits: list[float]
) -> None:
    """A wrong download (another file, a changed archive) fails the pinned SHA-256 on every
    attempt: nothing is unpacked, nothing is left."""
    body, _ = archive
    other = body.replace(b"description", b"something else")
    server.replies = [Reply(body=other)]
    root = tmp_path / "downloaded"
    with pytest.raises(DataError) as info:
        data.load_uci_har(root, progress=False)
    name = ARCHIVE_PATH.removeprefix("/")
    assert str(info.value) == (
        f"could not download and unpack {download.UCI_HAR_URL} into {root}: SHA256 hash of "
        f"downloaded file ({name}) does not match the known hash: expected "
        f"sha256:{hashlib.sha256(body).hexdigest()} but got {hashlib.sha256(other).hexdigest()}. "
        "Deleted download for safety. The downloaded file may have been corrupted or the known "
        f"hash may be outdated. Download it by hand and unzip it, then 'UCI HAR Dataset.zip' "
        f"inside it, into {root}"
    )
    assert server.requests == [ARCHIVE_PATH] * 4
    assert list(root.iterdir()) == []


def test_archive_with_a_changed_file_is_refused(
    archive, server: ArchiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An archive that passes its own check (here: its hash replaced on purpose) is still
    checked file by file against the table."""
    source = tmp_path / "source"
    rewrite(source / data.UCI_HAR_FOLDER / "train/y_train.txt", set_line(1, "6"))
    body = zip_official_archive(source, tmp_path)
    register_archive_hash(monkeypatch, body)
    server.replies = [Reply(body=body)]
    root = tmp_path / "downloaded"
    path = root / data.UCI_HAR_FOLDER / "train/y_train.txt"
    with pytest.raises(DataError) as info:
        data.load_uci_har(root, progress=False)
    expected_hash = download.UCI_HAR_SHA256["train/y_train.txt"]
    actual_hash = hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(info.value) == (
        f"{path}: SHA-256 mismatch: expected {expected_hash}, got {actual_hash}. The file differs "
        f"from the official UCI HAR release; remove {root / data.UCI_HAR_FOLDER} to have the "
        "loader download it again"
    )


# --------------------------------------------------------------------------------------------
# load_dataset: validation split and standardisation


def test_validation_holds_out_whole_training_subjects(uci) -> None:
    root, expected = uci
    chosen = set()
    for seed in range(4):
        ds = data.load_dataset("uci_har", root, validation_subjects=2, seed=seed)
        val_subjects = set(np.unique(ds.val.subjects).tolist())
        rng = np.random.default_rng(seed)
        assert val_subjects == set(rng.choice(np.unique(TRAIN_SUBJECTS), 2, replace=False).tolist())
        assert val_subjects.isdisjoint(ds.train.subjects.tolist())
        assert val_subjects.isdisjoint(TEST_SUBJECTS)
        assert len(ds.train.y) + len(ds.val.y) == 18 and len(ds.val.y) == 2 * ROWS_PER_SUBJECT
        np.testing.assert_array_equal(ds.test.subjects, expected["test"].subjects)
        again = data.load_dataset("uci_har", root, validation_subjects=2, seed=seed)
        np.testing.assert_array_equal(again.val.x, ds.val.x)
        chosen.add(frozenset(val_subjects))
    assert len(chosen) > 1
    assert ds.name == "uci_har" and ds.num_classes == 6 and ds.class_names == CLASS_NAMES


def test_no_validation_split_and_too_many_subjects(uci) -> None:
    root, expected = uci
    ds = data.load_dataset("uci_har", root, validation_subjects=0, standardize=False)
    assert ds.val is None and ds.channel_mean is None and ds.channel_std is None
    assert_split_equal(ds.train, expected["train"])
    with pytest.raises(ValueError, match=r"validation_subjects=6, but .* only 6 subjects"):
        data.load_dataset("uci_har", root, validation_subjects=6)


def test_standardisation_is_fitted_on_the_training_part_only(uci) -> None:
    root, expected = uci
    ds = data.load_dataset("uci_har", root, validation_subjects=2, seed=1)
    raw = expected["train"]
    kept = ~np.isin(raw.subjects, ds.val.subjects)
    mean = raw.x[kept].astype(np.float64).mean(axis=(0, 1))
    std = raw.x[kept].astype(np.float64).std(axis=(0, 1))
    np.testing.assert_allclose(ds.channel_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(ds.channel_std, std, rtol=1e-5)
    assert not np.allclose(ds.channel_mean, raw.x.mean(axis=(0, 1)), rtol=1e-3)
    np.testing.assert_allclose(ds.train.x.mean(axis=(0, 1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.train.x.std(axis=(0, 1)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ds.val.x, (raw.x[~kept] - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.test.x, (expected["test"].x - mean) / std, rtol=1e-5, atol=1e-5)
    assert ds.train.x.dtype == ds.val.x.dtype == ds.test.x.dtype == np.float32


# --------------------------------------------------------------------------------------------
# The generic .npz format


def npz_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "X_train": rng.normal(size=(40, 5, 3)) * [1.0, 2.0, 3.0] + [0.0, 5.0, -5.0],
        "y_train": np.arange(40) % 4,
        "X_test": rng.normal(size=(10, 5, 3)),
        "y_test": np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4], dtype=np.uint8),
    }


def save_npz(tmp_path: Path, arrays: dict[str, np.ndarray], name: str = "mine.npz") -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_npz_without_subjects_splits_a_random_fraction(tmp_path: Path) -> None:
    arrays = npz_arrays()
    path = save_npz(tmp_path, arrays)
    ds = data.load_dataset(f"npz:{path}", validation_fraction=0.25, standardize=False, seed=3)
    assert ds.name == "mine" and ds.num_classes == 5 and ds.class_names == ("0", "1", "2", "3", "4")
    held_out = np.zeros(40, dtype=bool)
    held_out[np.random.default_rng(3).permutation(40)[:10]] = True
    np.testing.assert_array_equal(ds.val.x, arrays["X_train"][held_out].astype(np.float32))
    np.testing.assert_array_equal(ds.train.y, arrays["y_train"][~held_out])
    assert ds.train.subjects is None and ds.val.subjects is None and ds.test.subjects is None
    assert ds.test.y.dtype == np.int32
    np.testing.assert_array_equal(ds.test.y, arrays["y_test"])
    again = data.load_dataset(f"npz:{path}", validation_fraction=0.25, standardize=False, seed=3)
    np.testing.assert_array_equal(again.val.y, ds.val.y)
    assert data.load_dataset(f"npz:{path}", validation_fraction=0).val is None


def test_npz_with_subjects_and_standardisation(tmp_path: Path) -> None:
    arrays = npz_arrays() | {"subjects_train": np.repeat(np.arange(10, 20), 4)}
    ds = data.load_dataset(f"npz:{save_npz(tmp_path, arrays)}", validation_subjects=3, seed=0)
    held_out = np.random.default_rng(0).choice(np.arange(10, 20), 3, replace=False)
    np.testing.assert_array_equal(np.unique(ds.val.subjects), np.sort(held_out))
    kept = ~np.isin(arrays["subjects_train"], held_out)
    np.testing.assert_allclose(
        ds.channel_mean, arrays["X_train"][kept].mean(axis=(0, 1)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(ds.train.x.std(axis=(0, 1)), 1.0, rtol=1e-5)


def test_npz_own_validation_split_is_kept(tmp_path: Path) -> None:
    arrays = npz_arrays() | {"X_val": np.ones((4, 5, 3), np.int16), "y_val": np.array([3, 0, 1, 2])}
    ds = data.load_dataset(f"npz:{save_npz(tmp_path, arrays)}", standardize=False)
    assert len(ds.train.y) == 40 and ds.num_classes == 5
    np.testing.assert_array_equal(ds.val.x, np.ones((4, 5, 3), np.float32))
    assert ds.val.x.dtype == np.float32


def with_value(key: str, index: tuple[int, ...], value: float) -> Callable:
    def change(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        changed = arrays[key].astype(np.float64 if key.startswith("X") else np.int64)
        changed[index] = value
        return arrays | {key: changed}

    return change


BAD_NPZ = [
    pytest.param(
        lambda a: {k: v for k, v in a.items() if k != "X_test"},
        r"bad\.npz: missing array 'X_test'",
        id="missing",
    ),
    pytest.param(
        lambda a: a | {"X_train": a["X_train"][:, :, 0]},
        r"bad\.npz: X_train must have 3 axes \(N, T, C\), got shape \(40, 5\)",
        id="rank",
    ),
    pytest.param(
        lambda a: a | {"X_test": np.zeros((10, 5, 4))},
        r"bad\.npz: X_test has \(T, C\) = \(5, 4\), but X_train has \(5, 3\)",
        id="channels",
    ),
    pytest.param(
        lambda a: a | {"X_test": np.zeros((10, 6, 3))},
        r"bad\.npz: X_test has \(T, C\) = \(6, 3\), but X_train has \(5, 3\)",
        id="length",
    ),
    pytest.param(
        lambda a: a | {"y_train": a["y_train"][:-1]},
        r"bad\.npz: y_train has shape \(39,\), expected \(40,\): one label per row",
        id="label-count",
    ),
    pytest.param(
        lambda a: a | {"y_test": a["y_test"].astype(np.float64)},
        r"bad\.npz: y_test has dtype float64; labels must be integers",
        id="float-labels",
    ),
    pytest.param(
        with_value("y_train", (7,), -1),
        r"bad\.npz: y_train\[7\] = -1 is negative; labels must be integers >= 0",
        id="negative-label",
    ),
    pytest.param(
        with_value("X_test", (1, 2, 0), np.nan),
        r"bad\.npz: X_test\[1, 2, 0\] = nan is not a finite float32",
        id="nan",
    ),
    pytest.param(
        with_value("X_train", (0, 4, 2), 1e39),
        r"bad\.npz: X_train\[0, 4, 2\] = 1e\+39 is not a finite float32",
        id="float32-overflow",
    ),
    pytest.param(
        lambda a: a | {"X_val": a["X_test"]},
        r"bad\.npz: X_val and y_val must be given together",
        id="val-half",
    ),
    pytest.param(
        lambda a: a | {"subjects_train": np.arange(39)},
        r"bad\.npz: subjects_train has shape \(39,\), expected \(40,\): one subject id per row",
        id="subjects-count",
    ),
    pytest.param(
        lambda a: a | {"X_train": np.zeros((0, 5, 3)), "y_train": np.zeros(0, int)},
        r"bad\.npz: X_train has no rows",
        id="empty",
    ),
    pytest.param(
        with_value("y_train", (7,), 1000),
        r"bad\.npz: y_train\[7\] = 1000, but no row has a label in 5\.\.999: labels must number "
        r"the classes 0\.\.C-1 without gaps \(a typo\?\), or class_names must name all C classes$",
        id="label-typo",
    ),
    pytest.param(
        with_value("y_test", (2,), 6),
        r"bad\.npz: y_test\[2\] = 6, but no row has a label 5: labels must number",
        id="label-gap",
    ),
    pytest.param(
        lambda a: with_value("y_test", (3,), 5)(a) | {"class_names": np.array(list("abcde"))},
        r"bad\.npz: y_test\[3\] = 5 is not a class: class_names names 5 classes, labels 0\.\.4$",
        id="label-beyond-class-names",
    ),
    pytest.param(
        lambda a: a | {"class_names": np.arange(5)},
        r"bad\.npz: class_names must be a 1-D array of strings, one per class; got dtype int64, "
        r"shape \(5,\)$",
        id="class-names-not-strings",
    ),
    pytest.param(
        lambda a: a | {"class_names": np.array(["a", "b", "a", "c", "d"])},
        r"bad\.npz: class_names has a name twice: \['a', 'b', 'a', 'c', 'd'\]$",
        id="class-names-twice",
    ),
    pytest.param(
        lambda a: a | {"X_train": a["X_train"].astype(complex)},
        r"bad\.npz: X_train has dtype complex128; expected real numbers",
        id="complex",
    ),
]


def test_npz_class_names_and_classes_without_training_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``class_names`` names the classes (one may have no row at all); a class without a
    training row is a warning, naming where it does occur."""
    arrays = npz_arrays()  # y_train 0..3, y_test 0..4
    path = save_npz(tmp_path, arrays)
    with caplog.at_level(logging.WARNING, logger="experiments.data"):
        ds = data.load_dataset(f"npz:{path}")
    assert ds.class_names == ("0", "1", "2", "3", "4")
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}: no training row of class 4, only in y_test: the model cannot learn it"
    ]
    caplog.clear()
    names = np.array(["walk", "sit", "stand", "lie", "run", "jump"])
    path = save_npz(tmp_path, arrays | {"class_names": names}, name="named.npz")
    with caplog.at_level(logging.WARNING, logger="experiments.data"):
        ds = data.load_dataset(f"npz:{path}")
    assert ds.class_names == tuple(names) and ds.num_classes == 6
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}: no training row of class 4 ('run'), only in y_test; 5 ('jump'), in no array: "
        "the model cannot learn them"
    ]


def test_a_label_typo_stops_the_command_up_front(tmp_path: Path, capsys) -> None:
    """1000 among the labels 0..4: one line naming the array and the row, exit status 1 (the
    data is malformed), before any model of 1001 classes is built."""
    path = save_npz(tmp_path, with_value("y_train", (7,), 1000)(npz_arrays()), name="typo.npz")
    assert data_cli.main(["--dataset", f"npz:{path}"]) == 1
    assert capsys.readouterr().err == (
        f"error: {path}: y_train[7] = 1000, but no row has a label in 5..999: labels must "
        "number the classes 0..C-1 without gaps (a typo?), or class_names must name all C "
        "classes\n"
    )


@pytest.mark.parametrize(("change", "pattern"), BAD_NPZ)
def test_bad_npz_is_reported_with_key_and_index(tmp_path: Path, change, pattern: str) -> None:
    path = save_npz(tmp_path, change(npz_arrays()), name="bad.npz")
    with pytest.raises(DataError, match=pattern):
        data.load_dataset(f"npz:{path}")


def test_npz_file_problems_and_unknown_spec(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"absent\.npz: no such file"):
        data.load_dataset(f"npz:{tmp_path / 'absent.npz'}")
    (tmp_path / "text.npz").write_text("1 2 3\n")
    with pytest.raises(DataError, match=r"text\.npz: not an \.npz file"):
        data.load_dataset(f"npz:{tmp_path / 'text.npz'}")
    with pytest.raises(ValueError, match="unknown dataset spec 'har'"):
        data.load_dataset("har")


# --------------------------------------------------------------------------------------------
# Command line


def test_command_line_summary(uci, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root, _ = uci
    assert data_cli.main(["--data-dir", str(root), "--validation-subjects", "1"]) == 0
    out = capsys.readouterr().out
    assert f"data dir: {root}" in out
    assert "dataset uci_har: 6 classes, 8 steps x 9 channels" in out
    assert "train: x (15, 8, 9), y (15,)" in out and " test: x (6, 8, 9), y (6,)" in out
    assert "classes: WALKING 1, WALKING_UPSTAIRS 1, WALKING_DOWNSTAIRS 1" in out
    assert "2 subjects: 2 4" in out
    assert data_cli.main(["--spec", f"npz:{tmp_path / 'absent.npz'}"]) == 1
    assert "no such file" in capsys.readouterr().err
    assert data_cli.main(["--dataset", "har"]) == 2  # a usage error, not a problem of the data
    assert capsys.readouterr().err == (
        "error: unknown dataset spec 'har'; expected 'uci_har' or 'npz:PATH'\n"
    )


# --------------------------------------------------------------------------------------------
# The real dataset


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uci_har"
REAL_DATA = (
    Path(os.environ["LARNN_DATA_DIR"])
    if os.environ.get("LARNN_DATA_DIR")
    else SHARED_DATA
    if SHARED_DATA.is_dir()
    else None
)


@pytest.mark.skipif(REAL_DATA is None, reason="no UCI HAR copy: set LARNN_DATA_DIR")
def test_real_uci_har_matches_its_documented_facts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The parsed arrays are cached in a folder of the test's own, whether or not the copy is
    # writable (a writable one would otherwise get the cache file beside its data).
    monkeypatch.setattr(uci_har, "_cache_dirs", lambda root: [tmp_path / "cache"])
    before = sorted(REAL_DATA.rglob("*"))
    train, test, class_names = data.load_uci_har(REAL_DATA, download=False)
    assert class_names == CLASS_NAMES
    assert train.x.shape == (7352, 128, 9) and test.x.shape == (2947, 128, 9)
    np.testing.assert_array_equal(np.bincount(train.y), [1226, 1073, 986, 1286, 1374, 1407])
    np.testing.assert_array_equal(np.bincount(test.y), [496, 471, 420, 491, 532, 537])
    train_subjects = [1, 3, 5, 6, 7, 8, 11, 14, 15, 16, 17, 19, 21, 22, 23, 25, 26, 27, 28, 29, 30]
    np.testing.assert_array_equal(np.unique(train.subjects), train_subjects)
    np.testing.assert_array_equal(np.unique(test.subjects), [2, 4, 9, 10, 12, 13, 18, 20, 24])
    assert train.x[0, 0, 0] == np.float32(1.8085150e-004)
    assert train.x[0, 0, 6] == np.float32(1.0128170)
    assert len(list((tmp_path / "cache").glob("uci_har_*.npz"))) == 1
    forbid_parsing(monkeypatch)
    ds = data.load_dataset("uci_har", REAL_DATA)  # from the cache
    assert len(np.unique(ds.val.subjects)) == 4
    assert set(ds.val.subjects.tolist()) <= set(train_subjects)
    assert len(ds.train.y) + len(ds.val.y) == 7352
    assert sorted(REAL_DATA.rglob("*")) == before  # nothing written beside the data
