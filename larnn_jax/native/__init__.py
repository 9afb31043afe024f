"""The native LARNN step: a layer's whole scan, forward and backward, as C++ run by XLA's FFI.

On the CPU, XLA executes a LARNN layer's step as a chain of about 620 small operations, each
paying dispatch and a pass over memory (BENCHMARKS.md, *Where the time goes*). The native step runs
the whole sequence of one layer in one call (and its backward pass in another), with the window
read in place, and leaves XLA what is large and outside the recurrence: the input terms and the
weights' gradients. Same results as :func:`larnn_jax.scans.window_scan.window_scan` to float rounding, with the
same dropout masks (``tests/test_native.py``).

The library is compiled on first use with the system's C++ compiler (see
:mod:`larnn_jax.native.build`). Without a compiler, or with ``LARNN_JAX_NATIVE=0``, the XLA path
runs.

* :func:`available`: whether the native step can run here; :func:`unavailable_reason` says why
  not.
* :func:`why_not_covered`: why a given cell cannot use it (``None`` if it can).
* :func:`read_profile`: where the native step's time went, with ``LARNN_JAX_NATIVE_PROFILE=1``.
"""

from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.typing import DTypeLike

from larnn_jax.cell import LARNNCell
from larnn_jax.native import build


@functools.cache
def _build_outcome() -> str | None:
    """``None`` once the library is built and loaded, else why it could not be (once per process)."""
    try:
        build.load()
    except build.BuildError as error:
        return str(error)
    except OSError as error:  # loading the built library
        return f"the native LARNN library could not be loaded: {error}"
    return None


def unavailable_reason() -> str | None:
    """Why the native step cannot run in this process (``None`` if it can). Builds the library
    on first call (see :mod:`larnn_jax.native.build`)."""
    if os.environ.get("LARNN_JAX_NATIVE") == "0":
        return "LARNN_JAX_NATIVE=0 switches the native LARNN step off"
    if jax.default_backend() != "cpu":
        return f"the native LARNN step runs on the CPU backend, not {jax.default_backend()!r}"
    return _build_outcome()


def available() -> bool:
    """Whether the native LARNN step can run here (compiling it on first call)."""
    return unavailable_reason() is None


def why_not_covered(cell: nn.Module, dtype: DTypeLike | None = None) -> str | None:
    """Why the native step cannot run ``cell`` on inputs of ``dtype`` (``None`` if it can; a
    ``None`` dtype is not checked).

    Covered: :class:`~larnn_jax.LARNNCell` itself (not a subclass), ``norm='batch'``,
    ``cell_norm_placement='output'``, float32 or float64 throughout, every mode, positional
    encoding and activation option, the three dropouts with JAX's default PRNG (Threefry,
    partitionable), training and evaluation.
    """
    if type(cell) is not LARNNCell:
        return f"{type(cell).__name__} is not LARNNCell"
    if cell.norm != "batch":
        return f"norm={cell.norm!r} (the native step covers norm='batch')"
    if cell.cell_norm_placement != "output":
        return f"cell_norm_placement={cell.cell_norm_placement!r} (it covers 'output')"
    dtypes = {jnp.dtype(d) for d in (dtype, cell.param_dtype, cell.dtype) if d is not None}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (jnp.float32, jnp.float64):
        names = ", ".join(sorted(d.name for d in dtypes))
        return f"inputs and parameters must all be float32 or all float64, not {names}"
    if cell.draws_dropout:
        impl = jax.config.jax_default_prng_impl  # type: ignore[attr-defined]
        if impl != "threefry2x32":
            return f"dropout with the {impl} PRNG (the native step draws Threefry bits)"
        if not jax.config.jax_threefry_partitionable:  # type: ignore[attr-defined]
            return "dropout with jax_threefry_partitionable off"
    return None


#: The sections of the native step that ``LARNN_JAX_NATIVE_PROFILE=1`` times (``csrc/profile.h``,
#: in its ``Section`` order).
PROFILE_SECTIONS = (
    "forward: entering entry (dropout, c' W_kv + b, elu)",
    "forward: window statistics (moment sums, positional features)",
    "forward: products (x W0, h W1, attended W_o, a W_a)",
    "forward: attention (q, scores, softmax, dropout, context)",
    "forward: batch norms of a, z, c, h",
    "forward: gates, LSTM update, output dropout, copies",
    "backward: recomputation (norm maps, z, elu(c), output dropout)",
    "backward: batch norms",
    "backward: gates and LSTM update",
    "backward: products (dz W_a^T, d W_o^T, d[q|z] W1^T, dE W_kv^T)",
    "backward: attention and window cotangents",
    "backward: window norms and moment sums",
    "backward: entering entry",
    "waiting at barriers (both passes)",
)


def read_profile() -> dict[str, float]:
    """Thread CPU seconds per :data:`PROFILE_SECTIONS` entry, summed over a call's threads, since
    the last read (which this one resets). All zero unless ``LARNN_JAX_NATIVE_PROFILE=1`` was set
    before the native step first ran in this process; with it, every section costs two reads of
    the thread's CPU clock."""
    seconds = (ctypes.c_double * len(PROFILE_SECTIONS))()
    sections = build.load().larnn_profile_read(seconds, len(PROFILE_SECTIONS))
    if sections != len(PROFILE_SECTIONS):
        raise RuntimeError(f"the native library times {sections} sections, not the listed ones")
    return dict(zip(PROFILE_SECTIONS, seconds, strict=True))
