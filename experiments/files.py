"""Files the pipeline writes and checks: whole-or-unchanged writes, and SHA-256 digests.

* :func:`atomic_write`: a file written through a temporary file beside it and renamed over it,
  so that a crash leaves either the old file or the new one, never a part of one (run
  configurations, metrics, checkpoint manifests, predictions, the parsed-data cache);
* :func:`sha256_file`: the SHA-256 of a file, read in blocks (the UCI HAR files, checkpoint
  manifests);
* :func:`check_output_file`: a command's output file checked before the command does any work:
  its folder exists, and it is none of the command's inputs.

Only the standard library: the dataset code imports this module without the pipeline's extras.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import IO, Any, Literal


@contextlib.contextmanager
def atomic_write(
    path: os.PathLike[str] | str, mode: Literal["w", "wb"] = "w", *, durable: bool = False
) -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path`` for writing; when the block ends without an
    exception, the temporary file replaces ``path`` in one rename, else it is removed and
    ``path`` is left as it was.

    Args:
        path: the file to write.
        mode: ``"w"`` (text, UTF-8) or ``"wb"`` (bytes).
        durable: flush the data to the disk before the rename (``fsync``), so that the file is
            whole even after a power failure, not only after a crash of the process.

    The temporary file is ``.<name>.<pid>.tmp`` in the same folder (a rename is atomic only
    within one file system), created with the usual permissions (the umask's).
    """
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        file: IO[Any]
        with (
            open(temporary, "wb") if mode == "wb" else open(temporary, "w", encoding="utf-8")
        ) as file:
            yield file
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomically(
    path: os.PathLike[str] | str, text: str, *, durable: bool = False
) -> None:
    """Writes ``text`` to ``path`` with :func:`atomic_write`: the file is whole or unchanged."""
    with atomic_write(path, durable=durable) as file:
        file.write(text)


def sha256_file(path: os.PathLike[str] | str) -> str:
    """The SHA-256 of the file at ``path``, as 64 hexadecimal digits (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OutputPathError(ValueError):
    """A path that a command cannot, or must not, write its output to."""


def check_output_file(
    path: os.PathLike[str] | str,
    *,
    inputs: Iterable[os.PathLike[str] | str] = (),
    overwrite: bool = True,
) -> pathlib.Path:
    """``path`` as a :class:`pathlib.Path`, once checked that a file can be written there
    without destroying anything: it is not a folder, its folder exists, it is none of
    ``inputs`` (the command's input files), not even under another name (a link), and, unless
    ``overwrite`` (a command's ``--overwrite``), it does not exist.

    Raises:
        OutputPathError: the problem, naming ``path``.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path} is a folder, not a file")
    if not path.parent.is_dir():
        raise OutputPathError(f"{path}: the folder {path.parent} does not exist")
    for source in inputs:
        if path.exists() and os.path.exists(source) and os.path.samefile(path, source):
            raise OutputPathError(
                f"{path} is the input file {source}: writing there would destroy it; choose "
                "another output file"
            )
    if not overwrite and path.exists():
        raise OutputPathError(f"{path} exists already; choose another file, or --overwrite")
    return path
