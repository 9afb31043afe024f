"""A LARNN layer's scan over time whose gradient keeps only the entries that enter the window.

Differentiating a plain scan over :class:`~larnn_jax.LARNNCell` stores every step's carry, and the
carry holds the ``(B, k-1, H)`` window: ``T·k`` entries per sample. But the window at step ``t``
is exactly the entries made at steps ``t-k+1 … t-1`` (``docs/model.md``, section 2). So here:

* the entries live in one buffer per kind (keys, values), ``(B, T + k, H)``, written once each
  (newest first, the initial carry's older entries after them), and every step reads its
  window as a slice of it: the window never moves;
* the forward pass keeps that buffer and the small per-step carries (``h``, ``c``, the window's
  moment sums), ``O(T·H)`` per sample;
* the backward pass (a ``jax.custom_vjp``) walks time in reverse, re-slices each step's window
  from the buffer, recomputes the step and pulls its cotangents back through it, adding the
  window's cotangent into a buffer of the same layout.

The step itself is the cell's own :meth:`~larnn_jax.LARNNCell.step`, passed in as a pure
function, so this module holds no model arithmetic: it only schedules it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from larnn_jax.typing import PyTree
from larnn_jax.window import WindowState, WindowView, valid_mask


class StepFunction(NamedTuple):
    """The pure parts of a cell's step that :func:`window_scan` schedules.

    Attributes:
      enter: ``enter(params, c, key) -> (key_entry, value_entry)``: the entries ``(B, H)`` with
        which ``c = c_{t-1}`` enters the window (:meth:`~larnn_jax.LARNNCell.enter`).
      step_over_window: ``step_over_window(params, stats, h, c, window, sums, terms, key) ->
        ((h_t, c_t, next_sums), new_stats)``: the rest of the step
        (:meth:`~larnn_jax.LARNNCell.step_over_window`) over ``window`` (a :class:`~larnn_jax.window.WindowView`), from
        ``h = h_{t-1}``, ``c = c_{t-1}``, the window state's moment sums and the step's input
        terms (a pytree of ``(B, …)`` arrays); also returns the updated running statistics.
      wrap_key: one step's raw key data → the keys for ``enter`` and ``step_over_window``.
    """

    enter: Callable[..., tuple[jax.Array, jax.Array]]
    step_over_window: Callable[..., tuple[tuple[jax.Array, jax.Array, jax.Array], PyTree]]
    wrap_key: Callable[[jax.Array], tuple[Any, Any]]


class ScanResult(NamedTuple):
    """What :func:`window_scan` returns, time-major.

    Attributes:
      outputs: ``(T, B, H)``, ``h_t`` of every step.
      cells: ``(T, B, H)``, ``c_t`` of every step.
      moment_sums: ``(T, B, S, H)``, the window state's sums after every step (``S`` is 4 or 0).
      key_buffer: ``(B, T + k, H)``, every key entry made (newest first: the entry with which
        ``c_s`` enters at step ``s + 1`` at index ``T - 1 - s``, from ``c_{T-1}`` at 0 to
        ``c_{-1}`` at ``T``), then the initial state's ``k - 1``.
      value_buffer: likewise for the value entries.
      stats: the running statistics after the sequence.
    """

    outputs: jax.Array
    cells: jax.Array
    moment_sums: jax.Array
    key_buffer: jax.Array
    value_buffer: jax.Array
    stats: PyTree


def window_scan(
    step: StepFunction,
    params: PyTree,
    stats: PyTree,
    h: jax.Array,
    c: jax.Array,
    window: WindowState,
    terms: PyTree,
    keys: jax.Array,
) -> ScanResult:
    """Runs ``step`` over ``T`` steps from the carry ``(h, c, window)``, with an ``O(T·H)`` gradient.

    Args:
      step: the cell's step (see :class:`StepFunction`).
      params: the cell's parameters (differentiated).
      stats: the running statistics the step reads and updates (not differentiated).
      h, c: ``(B, H)`` initial ``h_{-1}`` and ``c_{-1}``.
      window: the initial window state (its ``k - 1`` entries newest first).
      terms: pytree of ``(T, B, …)`` per-step input terms.
      keys: ``(T + 1, …)`` raw key data, one per step and one for ``c_{T-1}``'s entry (see
        ``StepFunction.wrap_key``).

    Returns:
      A :class:`ScanResult`.
    """
    return _window_scan(step, params, stats, h, c, window, terms, keys)


def _step_view(
    key_buffer: jax.Array,
    value_buffer: jax.Array,
    initial_count: jax.Array,
    t: jax.Array,
    steps: int,
) -> WindowView:
    """Step ``t``'s window, its entering entry (index ``T - t``) first, read from the buffers."""
    window_size = key_buffer.shape[-2] - steps
    start = steps - t
    count = jnp.minimum(initial_count + t + 1, window_size)
    return WindowView(
        jax.lax.dynamic_slice_in_dim(key_buffer, start, window_size, axis=-2),
        jax.lax.dynamic_slice_in_dim(value_buffer, start, window_size, axis=-2),
        valid_mask(count, window_size),
        count,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _window_scan(step, params, stats, h, c, window, terms, keys):
    return _forward(step, params, stats, h, c, window, terms, keys)


def _forward(step, params, stats, h, c, window, terms, keys):  # window_scan's arguments
    steps = keys.shape[0] - 1

    def write(buffers, entries, index):
        return tuple(
            jax.lax.dynamic_update_index_in_dim(buffer, entry, index, -2)
            for buffer, entry in zip(buffers, entries, strict=True)
        )

    def body(carry, inputs):
        h, c, sums, buffers, stats = carry
        t, terms_t, key_t, next_key = inputs
        key_buffer, value_buffer = buffers
        view = _step_view(key_buffer, value_buffer, window.count, t, steps)
        (output, c, sums), stats = step.step_over_window(
            params, stats, h, c, view, sums, terms_t, step.wrap_key(key_t)[1]
        )
        # c_t enters the next step's window. Written after this step's reads, which it depends
        # on, so that the buffer is updated in place.
        entering = step.enter(params, c, step.wrap_key(next_key)[0])
        buffers = write(buffers, entering, steps - 1 - t)
        return (output.astype(h.dtype), c, sums, buffers, stats), (output, c, sums)

    # Slot 0 receives the entry of c_{T-1}, which no step of this sequence reads.
    buffers = tuple(
        jnp.concatenate(
            [jnp.zeros((*older.shape[:-2], steps + 1, older.shape[-1]), older.dtype), older],
            axis=-2,
        )
        for older in (window.key_entries, window.value_entries)
    )
    buffers = write(buffers, step.enter(params, c, step.wrap_key(keys[0])[0]), steps)
    (_, _, _, buffers, stats), (outputs, cells, sums) = jax.lax.scan(
        body,
        (h, c, window.moment_sums, buffers, stats),
        (jnp.arange(steps), terms, keys[:-1], keys[1:]),
    )
    key_buffer, value_buffer = buffers
    return ScanResult(outputs, cells, sums, key_buffer, value_buffer, stats)


def _forward_rule(step, params, stats, h, c, window, terms, keys):
    result = _forward(step, params, stats, h, c, window, terms, keys)
    # The backward pass recomputes steps with the statistics the sequence started from: they are
    # only read in evaluation, where they do not change.
    return result, (params, stats, h, c, window, terms, keys, result)


def _backward_rule(step, residuals, d_result):
    params, stats, h0, c0, window, terms, keys, result = residuals
    steps = keys.shape[0] - 1
    # One flat vector: its gradient accumulates in one addition per step, not one per array.
    flat_params, unflatten = jax.flatten_util.ravel_pytree(params)
    # The carry each step starts from: the one after the step before (or the initial one).
    h_before = jnp.concatenate([h0[None], result.outputs[:-1].astype(h0.dtype)])
    c_before = jnp.concatenate([c0[None], result.cells[:-1]])
    sums_before = jnp.concatenate([window.moment_sums[None], result.moment_sums[:-1]])

    def body(carry, inputs):
        d_h, d_c, d_sums, d_key_buffer, d_value_buffer, d_params = carry
        t, h, c, sums, terms_t, key_t, d_output, d_cell, d_step_sums = inputs
        enter_key, step_key = step.wrap_key(key_t)
        view = _step_view(result.key_buffer, result.value_buffer, window.count, t, steps)

        def step_over_window(flat_params, h, c, sums, key_entries, value_entries, terms_t):
            window = view._replace(key_entries=key_entries, value_entries=value_entries)
            params = unflatten(flat_params)
            args = (params, stats, h, c, window, sums, terms_t, step_key)
            return step.step_over_window(*args)[0]

        _, pull_back_step = jax.vjp(
            step_over_window, flat_params, h, c, sums, view.key_entries, view.value_entries, terms_t
        )
        d_params_step, d_h, d_c_step, d_sums, d_keys, d_values, d_terms_t = pull_back_step(
            (d_output + d_h.astype(d_output.dtype), d_c + d_cell, d_sums + d_step_sums)
        )
        # The window's cotangent goes into the buffer. The entry that entered at step t is read
        # by steps t … t+k-1, all pulled back by now: its cotangent is complete.
        index = steps - t
        d_key_buffer = _add_to_window(d_key_buffer, d_keys, index)
        d_value_buffer = _add_to_window(d_value_buffer, d_values, index)
        d_entering = [
            jax.lax.dynamic_index_in_dim(buffer, index, -2, keepdims=False)
            for buffer in (d_key_buffer, d_value_buffer)
        ]
        _, pull_back_enter = jax.vjp(
            lambda flat, c: step.enter(unflatten(flat), c, enter_key), flat_params, c
        )
        d_params_enter, d_c_enter = pull_back_enter(tuple(d_entering))
        d_params = d_params + d_params_step + d_params_enter
        carry = (d_h, d_c_step + d_c_enter, d_sums, d_key_buffer, d_value_buffer, d_params)
        return carry, d_terms_t

    initial = (
        jnp.zeros_like(h0),
        jnp.zeros_like(c0),
        jnp.zeros_like(window.moment_sums),
        d_result.key_buffer,
        d_result.value_buffer,
        jnp.zeros_like(flat_params),
    )
    inputs = (
        jnp.arange(steps),
        h_before,
        c_before,
        sums_before,
        terms,
        keys[:-1],
        d_result.outputs,
        d_result.cells,
        d_result.moment_sums,
    )
    (d_h, d_c, d_sums, d_key_buffer, d_value_buffer, d_params), d_terms = jax.lax.scan(
        body, initial, inputs, reverse=True
    )
    d_window = WindowState(
        d_key_buffer[..., steps + 1 :, :],
        d_value_buffer[..., steps + 1 :, :],
        _zero_cotangent(window.count),
        d_sums,
    )
    d_stats = jax.tree.map(jnp.zeros_like, stats)
    return unflatten(d_params), d_stats, d_h, d_c, d_window, d_terms, _zero_cotangent(keys)


def _add_to_window(buffer: jax.Array, cotangent: jax.Array, start: jax.Array) -> jax.Array:
    """Adds a window's cotangent ``(B, k, H)`` into ``buffer`` at positions ``start …``."""
    size = cotangent.shape[-2]
    current = jax.lax.dynamic_slice_in_dim(buffer, start, size, axis=-2)
    return jax.lax.dynamic_update_slice_in_dim(buffer, current + cotangent, start, axis=-2)


def _zero_cotangent(x: jax.Array) -> Any:
    """The cotangent of an integer input: zeros of dtype ``float0``."""
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


_window_scan.defvjp(_forward_rule, _backward_rule)
