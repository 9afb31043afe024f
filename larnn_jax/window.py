"""The LARNN window: a first-in-first-out queue of the ``k`` most recent cell states, and the keys
and values the attention reads from it.

The cell never keeps raw cell states: each state is projected to a key entry and a value entry once,
when it enters (``docs/model.md``, *Keeping projected entries*), and the queue holds those, with
its features in head-minor order (:func:`head_minor_order`). This module is the queue's state, the
pure functions on it, and the window's keys and values (:func:`stored_entries`,
:func:`normalised_keys_and_values`: positional encoding, activation and normalisation);
:class:`WindowScheme` says, once per cell configuration, what an entry holds and how the window's
batch statistics are taken. The cell's layers that do it are :class:`WindowLayers`.

Shapes: batch ``B`` (any number of leading axes), window ``k``, features ``H``, heads ``n``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.typing import DTypeLike

from larnn_jax.normalization import FeatureNorm


def positional_encoding(window_size: int, dtype: np.typing.DTypeLike = np.float32) -> np.ndarray:
    """The LARNN positional encoding of the window (docs/model.md §1), as in the paper's Fig. 4.

    Row ``p - 1`` encodes position ``p`` (1 = the most recent entry, ``k`` = the oldest). With
    ``b = ceil(log2(4k))``, a row is ``[cos(2πp/2^i) for i = 1..b] ++ [sin(2πp/2^i) for
    i = 2..b+1]``: wavelengths are powers of two, the longest at least four times the window.

    Args:
      window_size: ``k >= 1``.
      dtype: dtype of the result (computed in float64).

    Returns:
      ``(k, 2b)`` array.
    """
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    num_wavelengths = (4 * window_size - 1).bit_length()  # ceil(log2(4k)) without float error
    position = np.arange(1, window_size + 1, dtype=np.float64)[:, None]
    exponent = np.arange(1, num_wavelengths + 1, dtype=np.float64)[None, :]
    cosines = np.cos(2 * np.pi * position / 2.0**exponent)
    sines = np.sin(2 * np.pi * position / 2.0 ** (exponent + 1))
    return np.concatenate([cosines, sines], axis=1).astype(dtype)


def head_minor_order(features: int, num_heads: int) -> np.ndarray:
    """The window's feature order: position ``d·n + h`` holds feature ``h·d_k + d``.

    Head ``h`` owns the contiguous features ``h·d_k … (h+1)·d_k - 1`` (``d_k = H / n``); in
    head-minor order its ``d``-th feature sits at ``d·n + h``, so a head's sum over its features is
    the sum of ``d_k`` contiguous blocks of ``n`` values. ``x[..., order]`` puts the last axis in
    this order, ``x[..., np.argsort(order)]`` back.
    """
    head_size = features // num_heads
    return np.arange(features).reshape(num_heads, head_size).T.reshape(-1)


def to_head_minor(x: jax.Array, num_heads: int) -> jax.Array:
    """``(..., H)`` in the natural order → head-minor order (``x[..., head_minor_order(H, n)]``,
    as a transpose: its gradient is a transpose too, not a scatter)."""
    head_size = x.shape[-1] // num_heads
    grid = x.reshape(*x.shape[:-1], num_heads, head_size)
    return jnp.swapaxes(grid, -1, -2).reshape(x.shape)


def from_head_minor(x: jax.Array, num_heads: int) -> jax.Array:
    """The inverse of :func:`to_head_minor`."""
    head_size = x.shape[-1] // num_heads
    grid = x.reshape(*x.shape[:-1], head_size, num_heads)
    return jnp.swapaxes(grid, -1, -2).reshape(x.shape)


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
    count: jax.Array  # type: ignore[assignment]  # a field named like the method tuple.count
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
    count: jax.Array  # type: ignore[assignment]  # a field named like the method tuple.count


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
      activates: keys and values are ``norm(elu(·))`` (else the identity: no activation, and
        no norm).
      num_heads: ``n``, which fixes the head-minor order of the entries' features.
    """

    caches_activation: bool
    carries_moments: bool
    folds_batch_norm: bool
    activates: bool
    num_heads: int

    @classmethod
    def for_cell(
        cls,
        *,
        activation_on_keys_and_values: bool,
        use_positional_encoding: bool,
        norm: str,
        num_heads: int,
    ) -> WindowScheme:
        """The scheme of a cell with these options (``norm``: ``'batch'``, ``'layer'``, ``'none'``)."""
        caches = activation_on_keys_and_values and not use_positional_encoding
        folds = activation_on_keys_and_values and norm == "batch"
        return cls(
            caches_activation=caches,
            carries_moments=caches and folds,
            folds_batch_norm=folds,
            activates=activation_on_keys_and_values,
            num_heads=num_heads,
        )


class WindowLayers(NamedTuple):
    """The cell's layers that make the window's keys and values from its cell states.

    Attributes:
      key, value: ``W_k c + b_k`` and ``W_v c + b_v`` (dense, ``H → H``).
      key_position, value_position: the rows of ``W_k`` / ``W_v`` that multiply the positional
        encoding (dense, ``2b → H``, no bias), or ``None`` without positional encoding.
      key_norm, value_norm: the norms of keys and values.
    """

    key: nn.Module
    value: nn.Module
    key_position: nn.Module | None
    value_position: nn.Module | None
    key_norm: FeatureNorm
    value_norm: FeatureNorm


def empty_state(
    batch: tuple[int, ...],
    window_size: int,
    features: int,
    dtype: DTypeLike,
    sums_dtype: DTypeLike,
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


def stored_entries(
    layers: WindowLayers, c: jax.Array, scheme: WindowScheme
) -> tuple[jax.Array, jax.Array]:
    """What the window stores for cell state ``c`` ``(B, H)``: its key and value entries
    ``(B, H)`` in head-minor order, ``W c + b`` each, and ``elu`` of it where the scheme caches
    the activation."""
    key, value = (to_head_minor(layer(c), scheme.num_heads) for layer in (layers.key, layers.value))
    if scheme.caches_activation:
        return jax.nn.elu(key), jax.nn.elu(value)
    return key, value


def normalised_keys_and_values(
    layers: WindowLayers,
    view: WindowView,
    moment_sums: jax.Array,
    scheme: WindowScheme,
    *,
    running: bool,
) -> tuple[AffineEntries, AffineEntries, jax.Array]:
    """The window's keys and values, ``K_j = norm(act(E_K,j + P_K pe(j)))`` and likewise ``V_j``,
    and the moment sums for the next step's state.

    The positional encoding's projection is added and the activation applied where the entries do
    not hold them yet (entry ``j`` is at position ``j + 1``). With ``scheme.folds_batch_norm`` the
    batch norms are returned as affine maps of the activated entries (their statistics from the
    carried ``moment_sums`` where ``scheme.carries_moments``, else from the window's valid
    entries; the running averages in evaluation); otherwise the norms are applied.

    Args:
      layers: the cell's :class:`WindowLayers`.
      view: this step's window (:func:`push`).
      moment_sums: ``(B, 4, H)`` (or ``(B, 0, H)``) sums over the state's entries before this step.
      scheme: the cell's :class:`WindowScheme`.
      running: use the running averages (evaluation) instead of the window's statistics.

    Returns:
      Keys, values (:class:`AffineEntries`, head-minor order) and the next step's moment sums.
    """
    keys = _activated(view.key_entries, layers.key_position, scheme)
    values = _activated(view.value_entries, layers.value_position, scheme)
    key_moments = value_moments = None
    if scheme.carries_moments:
        zero = jnp.zeros((view.key_entries.shape[-1],), view.key_entries.dtype)
        reference = jax.lax.stop_gradient(
            jnp.stack(stored_entries(layers, zero, scheme)).astype(moment_sums.dtype)
        )
        window_sums, moment_sums = slide_moment_sums(view, moment_sums, reference)
        if not running:
            key_moments, value_moments = moments_from_sums(window_sums, view.count, reference)
    order = head_minor_order(keys.shape[-1], scheme.num_heads)
    norm: dict[str, Any] = dict(use_running_average=running, feature_order=order)
    if not scheme.folds_batch_norm:
        return (
            AffineEntries(layers.key_norm(keys, view.mask, **norm), 1.0, 0.0),
            AffineEntries(layers.value_norm(values, view.mask, **norm), 1.0, 0.0),
            moment_sums,
        )
    # The keys' shift adds a per-head constant to every score, which the softmax cancels.
    key_scale, _ = layers.key_norm.scale_and_shift(keys, view.mask, moments=key_moments, **norm)
    value_scale, value_shift = layers.value_norm.scale_and_shift(
        values, view.mask, moments=value_moments, **norm
    )
    return (
        AffineEntries(keys, key_scale, 0.0),
        AffineEntries(values, value_scale, value_shift),
        moment_sums,
    )


def _activated(entries: jax.Array, position: nn.Module | None, scheme: WindowScheme) -> jax.Array:
    """Stored entries ``(B, k, H)`` → the keys or values before normalisation ``(B, k, H)``:
    with the projected positional encoding added, and the activation where not cached."""
    if position is None:
        return entries
    table = positional_encoding(entries.shape[-2], jnp.result_type(entries.dtype, jnp.float32))
    projected = to_head_minor(position(jnp.asarray(table)), scheme.num_heads)
    return jax.nn.elu(entries + projected) if scheme.activates else entries + projected
