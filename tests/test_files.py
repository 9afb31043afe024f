"""experiments.files: writes that leave a file whole or unchanged, and SHA-256 digests."""

from __future__ import annotations

import hashlib
import os
import pathlib

import pytest

from experiments.files import atomic_write, sha256_file, write_text_atomically


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(path) as file:
        file.write("half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_whole_write_replaces_the_file_with_the_usual_permissions(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")
    write_text_atomically(path, "é new\n", durable=True)
    assert path.read_text(encoding="utf-8") == "é new\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with atomic_write(tmp_path / "cache.npz", "wb") as file:
        file.write(b"\x00\x01")
    assert (tmp_path / "cache.npz").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz", "metrics.jsonl"]


def test_sha256_of_a_file_larger_than_one_block(tmp_path: pathlib.Path) -> None:
    data = bytes(range(256)) * 5000  # 1.28 MB: two blocks of 1 MiB
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
