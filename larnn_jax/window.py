"""The LARNN window: a first-in-first-out queue of the ``k`` most recent cell states' entries.

The cell never keeps raw cell states: each state is projected to a key entry and a value entry once,
when it enters (``docs/model.md``, *Keeping projected entries*), and the queue holds those. This
module is the queue's state and the pure functions on it; :class:`WindowScheme` says, once per cell
configuration, what an entry holds and how the window's batch statistics are taken.

Shapes: batch ``B`` (any number of leading axes), window ``k``, features ``H``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from larnn_jax.normalization import FeatureNorm


class WindowState(NamedTuple):
    """What a cell carries of its window between steps: the ``k - 1`` entries that stay.

    Before step ``t`` the window is ``c_{t-1}, …, c_{t-k}``; ``c_{t-1}`` is still the carry's
    plain cell state (it is projected when it enters, at step ``t``), so the state holds the
    entries of ``c_{t-2} … c_{t-k}``, newest first.

    Every feature axis is in the cell's window order (head-minor, see
    :func:`larnn_jax.attention.head_minor_order`).

    Attributes:
      key_entries: ``(B, k-1, H)`` stored key entries (see :class:`WindowScheme`); zeros where
        not yet filled.
      value_entries: ``(B, k-1, H)`` stored value entries, likewise.
      count: ``(B,)`` int32, how many entries are filled (``0 … k-1``).
      moment_sums: ``(B, 4, H)`` per-sample sums over the filled entries of ``d_key``,
        ``d_value``, ``d_key²``, ``d_value²``, where ``d`` is an entry minus the entry of a zero
        cell state (:func:`moments_from_sums`); ``(B, 0, H)`` where the scheme does not carry
        them.
    """

    key_entries: jax.Array
    value_entries: jax.Array
    count: jax.Array
    moment_sums: jax.Array


class WindowView(NamedTuple):
    """The whole window as one step attends over it: the entering entry first, then the state's.

    Attributes:
      key_entries: ``(B, k, H)``, entry ``j`` at position ``p = j + 1`` (1 = newest).
      value_entries: ``(B, k, H)``.
      mask: ``(B, k)`` bool, the filled entries (at least the newest).
      count: ``(B,)`` int32, how many are filled (``1 … k``).
    """

    key_entries: jax.Array
    value_entries: jax.Array
    mask: jax.Array
    count: jax.Array


class AffineEntries(NamedTuple):
    """The window's keys (or values) as an affine map of arrays it holds: ``entries · scale +
    shift``, so that a batch norm can be folded into the attention instead of applied to the
    ``(B, k, H)`` window (``docs/model.md``, *Folding the normalisation*).

    Attributes:
      entries: ``(B, k, H)``.
      scale, shift: ``(H,)`` in the window's feature order, or scalars (``1``, ``0``: the
        entries are the keys or values themselves).
    """

    entries: jax.Array
    scale: jax.Array | float
    shift: jax.Array | float


@dataclasses.dataclass(frozen=True)
class WindowScheme:
    """How a cell keeps its window and takes its statistics, decided from the cell's options.

    Attributes:
      caches_activation: entries hold ``elu(W e + b)`` rather than ``W e + b``. Possible when the
        keys and values are activated and have no positional encoding: then an entry never
        changes while it stays in the window.
      carries_moments: the window's batch statistics come from the carried
        :attr:`WindowState.moment_sums`, updated with the entering and the leaving entry
        (``O(B·H)`` per step instead of ``O(B·k·H)``). Needs cached entries and batch norm.
      folds_batch_norm: the batch norm of keys and values is folded into the query and the
        attention output instead of being applied to the window (``docs/model.md``, *Folding
        the normalisation*).
    """

    caches_activation: bool
    carries_moments: bool
    folds_batch_norm: bool

    @classmethod
    def for_cell(
        cls, *, activation_on_keys_and_values: bool, use_positional_encoding: bool, norm: str
    ) -> WindowScheme:
        """The scheme of a cell with these options (``norm``: ``'batch'``, ``'layer'``, ``'none'``)."""
        caches = activation_on_keys_and_values and not use_positional_encoding
        folds = activation_on_keys_and_values and norm == "batch"
        return cls(
            caches_activation=caches, carries_moments=caches and folds, folds_batch_norm=folds
        )


def empty_state(
    batch: tuple[int, ...],
    window_size: int,
    features: int,
    dtype,
    sums_dtype,
    carries_moments: bool,
) -> WindowState:
    """The state of a window that holds nothing but the entering entry: zeros, count 0."""
    entries = jnp.zeros((*batch, window_size - 1, features), dtype)
    sums = jnp.zeros((*batch, 4 if carries_moments else 0, features), sums_dtype)
    return WindowState(entries, entries, jnp.zeros(batch, jnp.int32), sums)


def valid_mask(count: jax.Array, window_size: int) -> jax.Array:
    """``(B,)`` counts → ``(B, k)`` bool: the first ``count`` positions are filled."""
    return jnp.arange(window_size) < count[..., None]


def push(state: WindowState, key_entry: jax.Array, value_entry: jax.Array) -> WindowView:
    """The window a step attends over: ``key_entry``/``value_entry`` ``(B, H)`` entering in front
    of the state's entries."""
    keys = jnp.concatenate(
        [key_entry[..., None, :].astype(state.key_entries.dtype), state.key_entries], axis=-2
    )
    values = jnp.concatenate(
        [value_entry[..., None, :].astype(state.value_entries.dtype), state.value_entries], axis=-2
    )
    window_size = keys.shape[-2]
    count = jnp.minimum(state.count + 1, window_size)
    return WindowView(keys, values, valid_mask(count, window_size), count)


def pop(view: WindowView, moment_sums: jax.Array) -> WindowState:
    """The state the next step starts from: the view without its oldest position."""
    window_size = view.key_entries.shape[-2]
    return WindowState(
        view.key_entries[..., :-1, :],
        view.value_entries[..., :-1, :],
        jnp.minimum(view.count, window_size - 1),
        moment_sums,
    )


def deviation_sums(key_entry: jax.Array, value_entry: jax.Array, reference: jax.Array) -> jax.Array:
    """One entry's terms of ``moment_sums``: ``(B, H)`` entries → ``(B, 4, H)``.

    ``reference``: ``(2, H)``, the key and value entries of a zero cell state (a constant that
    keeps ``E[d²] − E[d]²`` from cancelling; at the first step every entry equals it).
    """
    deviation = jnp.stack([key_entry, value_entry], axis=-2).astype(reference.dtype) - reference
    return jnp.concatenate([deviation, jnp.square(deviation)], axis=-2)


def slide_moment_sums(
    view: WindowView, moment_sums: jax.Array, reference: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The carried sums with the entering entry added, and without the one that leaves.

    Args:
      view: the window of this step (:func:`push`).
      moment_sums: ``(B, 4, H)`` sums over the state's entries before this step.
      reference: ``(2, H)``, see :func:`deviation_sums`.

    Returns:
      ``(sums over this step's window, sums over what stays for the next step)``, both
      ``(B, 4, H)``.
    """
    entering = deviation_sums(view.key_entries[..., 0, :], view.value_entries[..., 0, :], reference)
    leaving = deviation_sums(
        view.key_entries[..., -1, :], view.value_entries[..., -1, :], reference
    )
    full = (view.count == view.key_entries.shape[-2])[..., None, None]
    leaving = jnp.where(full, leaving, jnp.zeros_like(leaving))
    next_sums = moment_sums + entering - leaving
    # Computed from next_sums, so that everything read from the window precedes what the step
    # computes next: a scan that keeps the window in a buffer can then update it in place.
    return next_sums + leaving, next_sums


def moments_from_sums(
    moment_sums: jax.Array, count: jax.Array, reference: jax.Array
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """Batch mean and biased variance ``(H,)`` of the key entries and of the value entries.

    Args:
      moment_sums: ``(B, 4, H)`` sums over every sample's filled entries.
      count: ``(B,)`` how many entries each sample's window holds.
      reference: ``(2, H)``, see :func:`deviation_sums`.

    Returns:
      ``((key_mean, key_var), (value_mean, value_var))``.
    """
    totals = jnp.sum(moment_sums, axis=tuple(range(moment_sums.ndim - 2)))  # (4, H)
    means = totals / jnp.sum(count).astype(totals.dtype)
    deviation_mean, square_mean = means[:2], means[2:]
    variance = jnp.maximum(square_mean - jnp.square(deviation_mean), 0.0)
    mean = reference + deviation_mean
    return (mean[0], variance[0]), (mean[1], variance[1])


def normalised_keys_and_values(
    keys: jax.Array,
    values: jax.Array,
    view: WindowView,
    moment_sums: jax.Array,
    key_norm: FeatureNorm,
    value_norm: FeatureNorm,
    *,
    scheme: WindowScheme,
    reference: jax.Array,
    running: bool,
    feature_order: np.ndarray,
) -> tuple[AffineEntries, AffineEntries, jax.Array]:
    """The window's normalised keys and values, ``norm(keys)`` and ``norm(values)`` over its valid
    entries, and the moment sums for the next step's state.

    With ``scheme.folds_batch_norm`` the batch norms are returned as affine maps of ``keys`` and
    ``values`` (their statistics from the carried ``moment_sums`` where ``scheme.carries_moments``,
    else from the window; the running averages in evaluation); otherwise the norms are applied.

    Args:
      keys, values: ``(B, k, H)`` before normalisation, in ``feature_order``.
      view: this step's window (its mask and count).
      moment_sums: ``(B, 4, H)`` (or ``(B, 0, H)``) sums over the state's entries before this step.
      key_norm, value_norm: the cell's norms of keys and values.
      scheme: the cell's :class:`WindowScheme`.
      reference: ``(2, H)``, see :func:`deviation_sums`.
      running: use the running averages (evaluation) instead of the window's statistics.
      feature_order: the window's feature order (``head_minor_order``).

    Returns:
      Keys, values (:class:`AffineEntries`) and the next step's moment sums.
    """
    key_moments = value_moments = None
    if scheme.carries_moments:
        window_sums, moment_sums = slide_moment_sums(view, moment_sums, reference)
        if not running:
            key_moments, value_moments = moments_from_sums(window_sums, view.count, reference)
    norm = dict(use_running_average=running, feature_order=feature_order)
    if not scheme.folds_batch_norm:
        return (
            AffineEntries(key_norm(keys, view.mask, **norm), 1.0, 0.0),
            AffineEntries(value_norm(values, view.mask, **norm), 1.0, 0.0),
            moment_sums,
        )
    # The keys' shift adds a per-head constant to every score, which the softmax cancels.
    key_scale, _ = key_norm.scale_and_shift(keys, view.mask, moments=key_moments, **norm)
    value_scale, value_shift = value_norm.scale_and_shift(
        values, view.mask, moments=value_moments, **norm
    )
    return (
        AffineEntries(keys, key_scale, 0.0),
        AffineEntries(values, value_scale, value_shift),
        moment_sums,
    )
