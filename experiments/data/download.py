"""The UCI HAR files: where they live, what they must hash to, and their download.

* :func:`resolve_data_dir`: the folder that holds ``UCI HAR Dataset/`` (an argument, else
  ``$LARNN_DATA_DIR``, else the per-user cache folder);
* :data:`UCI_HAR_SHA256`: the SHA-256 of every file the loader reads, checked by
  :func:`verify_files` before any of them is used;
* :func:`download_uci_har`: the official archive, fetched with pooch, checked against
  :data:`UCI_HAR_ARCHIVE_SHA256` and unpacked.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import zipfile

from experiments.data.dataset import DataError
from experiments.files import sha256_file

#: The official archive; it holds an inner ``UCI HAR Dataset.zip`` with the ``UCI HAR Dataset/``
#: folder.
UCI_HAR_URL = (
    "https://archive.ics.uci.edu/static/public/240/human+activity+recognition+using+smartphones.zip"
)
#: Name of the dataset folder inside the data directory.
UCI_HAR_FOLDER = "UCI HAR Dataset"
#: SHA-256 of the official archive (61,005,872 bytes), checked before it is unpacked; replace it
#: to download a copy that differs on purpose.
UCI_HAR_ARCHIVE_SHA256 = "c00b803081a5c797cd5e4b83700a9810b38d53d9d84e01917e090e1fdbc81031"
#: The zip inside the official archive that holds :data:`UCI_HAR_FOLDER`.
INNER_ZIP = "UCI HAR Dataset.zip"
#: The channel order of the UCI HAR inputs (last axis).
UCI_HAR_CHANNELS: tuple[str, ...] = tuple(
    f"{sensor}_{axis}" for sensor in ("body_acc", "body_gyro", "total_acc") for axis in "xyz"
)
#: The two splits of the official release.
SPLITS = ("train", "test")

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


def signal_file(channel: str, split: str) -> str:
    """The file of one channel of one split, relative to ``UCI HAR Dataset/``."""
    return f"{split}/Inertial Signals/{channel}_{split}.txt"


#: Every file the UCI HAR loader reads, relative to ``UCI HAR Dataset/``.
UCI_HAR_FILES: tuple[str, ...] = (
    "activity_labels.txt",
    *(f"{split}/{kind}_{split}.txt" for split in SPLITS for kind in ("y", "subject")),
    *(signal_file(channel, split) for split in SPLITS for channel in UCI_HAR_CHANNELS),
)


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

    pooch (the ``train`` extra) is imported here, not with this module: loading data already on
    disk does not need it.
    """
    import pooch

    return pathlib.Path(pooch.os_cache("larnn_jax"))


def missing_files(folder: pathlib.Path) -> list[str]:
    """The files of :data:`UCI_HAR_FILES` that ``folder`` (a ``UCI HAR Dataset``) lacks."""
    return [name for name in UCI_HAR_FILES if not (folder / name).is_file()]


def verify_files(folder: pathlib.Path) -> dict[str, str]:
    """Check every file the loader reads against :data:`UCI_HAR_SHA256`; return the hashes."""
    hashes = {}
    for name in UCI_HAR_FILES:
        actual = sha256_file(folder / name)
        expected = UCI_HAR_SHA256[name]
        if actual != expected:
            raise DataError(
                f"{folder / name}: SHA-256 mismatch: expected {expected}, got {actual}. The file "
                f"differs from the official UCI HAR release; remove {folder} to have the loader "
                "download it again"
            )
        hashes[name] = actual
    return hashes


def download_uci_har(root: pathlib.Path, progress: bool) -> None:
    """Download the official archive with pooch and unpack ``UCI HAR Dataset/`` into ``root``.

    The archive is fetched with 3 retries and a tqdm progress bar when ``progress`` is true, and
    checked against :data:`UCI_HAR_ARCHIVE_SHA256` before anything is unpacked (pooch deletes a
    download that does not match and tries again, as for a failed transfer: a transfer cut short
    where HTTP could not tell fails the check); then both zip levels (the archive and the
    ``UCI HAR Dataset.zip`` inside it) are unpacked and removed, and every file is checked
    against :data:`UCI_HAR_SHA256` when it is loaded. When unpacking fails, the archive is
    removed as well, so that the next call downloads it again instead of failing on the same
    file. pooch (the ``train`` extra) is imported here.
    """
    import pooch

    archive = UCI_HAR_URL.rsplit("/", 1)[1]
    fetcher = pooch.create(
        path=root,
        base_url="",
        registry={archive: f"sha256:{UCI_HAR_ARCHIVE_SHA256}"},
        urls={archive: UCI_HAR_URL},
        retry_if_failed=3,
    )
    try:
        unpacked = fetcher.fetch(
            archive,
            processor=pooch.Unzip(members=[INNER_ZIP]),
            downloader=pooch.HTTPDownloader(progressbar=progress),
        )
        inner = [path for path in unpacked if pathlib.Path(path).name == INNER_ZIP]
        if not inner:
            raise DataError(f"{root / archive}: the archive has no '{INNER_ZIP}'")
        with zipfile.ZipFile(inner[0]) as zipped:
            members = [name for name in zipped.namelist() if name.startswith(f"{UCI_HAR_FOLDER}/")]
            if not members:
                raise DataError(f"{inner[0]}: no '{UCI_HAR_FOLDER}/' folder in the zip")
            zipped.extractall(root, members=members)
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as exc:  # ValueError: the hash (pooch)
        raise DataError(
            f"could not download and unpack {UCI_HAR_URL} into {root}: "
            f"{str(exc).rstrip('.')}. Download it by "
            f"hand and unzip it, then '{INNER_ZIP}' inside it, into {root}"
        ) from exc
    finally:
        (root / archive).unlink(missing_ok=True)
        shutil.rmtree(root / f"{archive}.unzip", ignore_errors=True)
