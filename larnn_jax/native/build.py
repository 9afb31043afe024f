"""Compiling the native LARNN step on first use, and loading it into XLA.

The C++ sources (``csrc/``, shipped with the package) are compiled with the system's C++
compiler (``$CXX``, else ``c++``) for the machine at hand (``-march=native``) into a cache
directory, ``$LARNN_JAX_CACHE_DIR`` or ``$XDG_CACHE_HOME/larnn_jax`` (default
``~/.cache/larnn_jax``), under a key that hashes the sources, the jaxlib version, the
compiler's version and the target it compiles for: a home directory shared by different
machines never loads a library built for another. The first use compiles (about 15 s on two
cores); later processes load the cached library. Two processes building at once are serialised
by a file lock, and a library is installed by an atomic rename, so nobody loads a half-written
file.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
LIBRARY_NAME = "liblarnn_native.so"
FLAGS = (
    "-O3",
    "-std=c++17",
    "-march=native",
    "-fPIC",
    "-shared",
    "-fno-math-errno",
    "-ffp-contract=fast",
)
#: The FFI targets the library defines (``XLA_FFI_DEFINE_HANDLER_SYMBOL``).
TARGETS = ("larnn_forward", "larnn_backward", "larnn_keep_mask")


class BuildError(RuntimeError):
    """The native library could not be built or loaded; the message says why, in one line."""


def cache_dir() -> Path:
    """Where compiled libraries are kept (see the module docstring)."""
    explicit = os.environ.get("LARNN_JAX_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "larnn_jax"


def compiler() -> list[str]:
    """The C++ compiler command (``$CXX`` or ``c++``); raises :class:`BuildError` if absent."""
    command = shlex.split(os.environ.get("CXX", "c++"))
    if not command or shutil.which(command[0]) is None:
        raise BuildError(
            f"no C++ compiler found ({command[0] if command else '$CXX is empty'!r} is not on "
            "PATH); install one (e.g. g++) or set CXX to use the native LARNN step"
        )
    return command


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


def build_key(command: list[str]) -> str:
    """Hash of the sources, jaxlib, the compiler's version and the target it compiles for."""
    digest = hashlib.sha256()
    for source in sorted(SOURCE_DIR.iterdir()):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    version = _run([*command, "--version"])
    # The macros the compiler defines for -march=native name the instruction sets it targets.
    target = _run([*command, "-march=native", "-dM", "-E", "-x", "c++", os.devnull])
    if target.returncode != 0:
        raise BuildError(f"{command[0]} cannot compile for this machine: {_tail(target.stderr)}")
    for part in (jaxlib.__version__, platform.machine(), version.stdout, target.stdout, FLAGS):
        digest.update(repr(part).encode())
    return digest.hexdigest()[:20]


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def build() -> Path:
    """The path of the compiled library, building it first if the cache does not have it."""
    command = compiler()
    key = build_key(command)
    directory = cache_dir() / "native" / key
    library = directory / LIBRARY_NAME
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():  # built by another process while this one waited
            return library
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            target = Path(scratch) / LIBRARY_NAME
            done = _run(
                [
                    *command,
                    *FLAGS,
                    "-isystem",
                    jax.ffi.include_dir(),
                    str(SOURCE_DIR / "larnn_ffi.cc"),
                    "-o",
                    str(target),
                ]
            )
            if done.returncode != 0:
                (directory / "build.log").write_text(done.stderr)
                raise BuildError(
                    f"compiling the native LARNN step failed ({directory / 'build.log'}): "
                    f"{_tail(done.stderr)}"
                )
            os.replace(target, library)
    return library


@functools.cache
def load() -> ctypes.CDLL:
    """Builds (if needed) and loads the library, and registers its FFI targets with XLA (CPU)."""
    library = ctypes.CDLL(str(build()))
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
    for name in ("larnn_residual_size", "larnn_backward_scratch_size"):
        function = getattr(library, name)
        function.restype = ctypes.c_int64
        function.argtypes = [ctypes.c_int64] * (9 if name == "larnn_residual_size" else 6)
    library.larnn_profile_read.restype = ctypes.c_int64
    library.larnn_profile_read.argtypes = [ctypes.POINTER(ctypes.c_double), ctypes.c_int64]
    return library
