"""How a recurrent layer runs its cell over a sequence: the scan switch, decided in one place.

A layer's ``scan`` (:class:`larnn_jax.LARNNLayer`, :class:`larnn_jax.LARNN`,
:class:`larnn_jax.models.SequenceClassifier`, ``--scan`` on the command line) is one of:

* ``'auto'`` (default): ``'native'`` for a :class:`~larnn_jax.LARNNCell` where the native step is
  available and covers the cell's options, else ``'fused'``; ``'plain'`` for any other cell. The
  choice and its reason are logged once (logger ``larnn_jax``).
* ``'native'``: the fused scan with the layer step in compiled C++ (:mod:`larnn_jax.native`).
* ``'fused'``: the fused scan in XLA (:mod:`larnn_jax.scans.fused`): the input projections of all
  steps in one product, the window in buffers written once per step, and a gradient that keeps
  ``O(T·H)`` per sample instead of every step's ``(B, k-1, H)`` window.
* ``'plain'``: ``nn.RNN`` over the cell (:mod:`larnn_jax.scans.plain`), for any cell.
  Differentiating it stores every step's carry (for a LARNN cell, ``T·k`` window entries per sample).
* ``'remat'``: training scans in rematerialised chunks of ``remat_chunk_length`` steps
  (:mod:`larnn_jax.scans.remat`), for any cell: ``T/N + N`` carries for about one more forward pass.
  Rematerialisation only changes how gradients are computed: in evaluation it is the plain scan.

Every scan gives the same results to float rounding, from the same variables; with dropout, each
draws its own masks (other draws of the same distribution). :func:`choose_scan` decides; an
impossible choice is an error that names the fix. ``LARNN_JAX_NATIVE=0`` in the environment keeps
``'auto'`` from choosing the native step.

The cells of :mod:`larnn_jax.cell` stay the reference every scan is tested against.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Literal, cast, get_args

from flax import linen as nn
from jax.typing import DTypeLike

from larnn_jax import native
from larnn_jax.cell import LARNNCell

Scan = Literal["auto", "native", "fused", "plain", "remat"]
SCANS: tuple[str, ...] = get_args(Scan)
#: What :func:`choose_scan` resolves a :data:`Scan` to.
ScanKind = Literal["native", "fused", "plain", "remat"]

#: The environment variable that, set to ``0``, keeps ``scan='auto'`` from the native step.
NATIVE_SWITCH = "LARNN_JAX_NATIVE"

logger = logging.getLogger("larnn_jax")


def check_scan(scan: str, remat_chunk_length: int | None) -> None:
    """Raises ``ValueError`` naming the problem unless ``scan`` is one of :data:`SCANS` and
    ``remat_chunk_length`` is a positive integer exactly when ``scan == 'remat'``."""
    if scan not in SCANS:
        raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
    if scan == "remat" and (remat_chunk_length is None or remat_chunk_length < 1):
        raise ValueError(f"scan='remat' needs remat_chunk_length >= 1, got {remat_chunk_length}")
    if scan != "remat" and remat_chunk_length is not None:
        raise ValueError(
            f"remat_chunk_length={remat_chunk_length} is only used with scan='remat', not {scan!r}"
        )


def runs_the_larnn_step(cell: nn.Module) -> bool:
    """Whether ``cell`` steps as :class:`~larnn_jax.LARNNCell` does, so that the fused scans, which
    schedule ``LARNNCell``'s own step functions, compute its step (a subclass that redefines one
    of them does not)."""
    step_functions = ("initialize_carry", "step", "enter", "step_over_window", "input_terms")
    return isinstance(cell, LARNNCell) and all(
        getattr(type(cell), name) is getattr(LARNNCell, name) for name in step_functions
    )


def native_unavailable_reason(cell: LARNNCell, dtype: DTypeLike | None = None) -> str | None:
    """Why the native step cannot run ``cell`` on inputs of ``dtype`` here (``None`` where it can).
    Compiles the native step on first call (:mod:`larnn_jax.native.build`)."""
    return native.why_not_covered(cell, dtype) or native.unavailable_reason()


def choose_scan(
    scan: str, cell: nn.Module, *, training: bool, dtype: DTypeLike | None = None
) -> ScanKind:
    """The scan a layer runs: ``scan`` (one of :data:`SCANS`) resolved for ``cell``, the mode and
    the inputs' ``dtype``.

    Raises:
      ValueError: naming the fix, where ``scan`` cannot run ``cell``.
    """
    larnn = runs_the_larnn_step(cell)
    if scan in ("native", "fused") and not larnn:
        raise ValueError(
            f"scan={scan!r} runs LARNNCell's own step, and {type(cell).__name__} is not a "
            "LARNNCell (or redefines its step): use scan='auto', 'plain' or 'remat'"
        )
    if scan == "remat":
        return "remat" if training else "plain"
    if scan != "auto":
        if (
            scan == "native"
            and (reason := native_unavailable_reason(cast(LARNNCell, cell), dtype)) is not None
        ):
            raise ValueError(
                f"scan='native' cannot run here: {reason}; use scan='auto' or 'fused' (XLA)"
            )
        return scan  # type: ignore[return-value]
    if not larnn:
        return "plain"
    if os.environ.get(NATIVE_SWITCH, "1") == "0":
        reason = f"{NATIVE_SWITCH}=0"
    else:
        reason = native_unavailable_reason(cast(LARNNCell, cell), dtype)
    kind: ScanKind = "fused" if reason else "native"
    _log_choice(kind, reason)
    return kind


@functools.cache
def _log_choice(kind: ScanKind, reason: str | None) -> None:
    """Logs ``scan='auto'``'s choice for a LARNN cell, once per choice and reason."""
    if kind == "native":
        logger.info("larnn_jax: scan='auto' runs the native LARNN step")
    else:
        logger.info("larnn_jax: scan='auto' runs the XLA fused scan (native step: %s)", reason)
