"""The fused scan: a :class:`~larnn_jax.LARNNCell` run over a sequence by :func:`window_scan`.

Same variables (``cell/...`` under this module, as under ``nn.RNN``) and the same results to
float rounding as the plain scan over the cell, but:

* the input terms of every step (``W_q^x x_t + b_q`` and ``W_x x_t + b``) are one matrix
  product over the whole sequence before the scan (the native step computes them step by step
  with the recurrent products);
* the window lives in buffers written once per step, and the gradient keeps ``O(T·H)`` per
  sample instead of every step's window (see :mod:`larnn_jax.scans.window_scan`);
* dropout keys are ``split(make_rng('dropout'), T)``, one per step: the masks are other draws
  of the same distribution than ``nn.RNN``'s.

The running statistics are carried through the scan and written back after it, as with
``nn.RNN(variable_carry='batch_stats')``; their own gradient is not computed (it is never
needed: in training the outputs do not depend on them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import PRNGKey

from larnn_jax.cell import LARNNCarry, LARNNCell, _check_input
from larnn_jax.native import layer as native_layer
from larnn_jax.scans.window_scan import ScanResult, StepFunction, window_scan
from larnn_jax.typing import PyTree
from larnn_jax.window import WindowState


class FusedScan(nn.Module):
    """Runs a :class:`~larnn_jax.LARNNCell` over a sequence with :func:`window_scan`.

    Attributes:
      cell: the cell, in the mode (``deterministic``) to run.
      native: run the scan natively (:mod:`larnn_jax.native`, which the caller checked covers
        the cell): the same computation, with the same dropout masks.
    """

    cell: LARNNCell
    native: bool = False

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        initial_carry: LARNNCarry | None,
        init_key: PRNGKey | None,
        seq_lengths: jax.Array | None,
    ) -> tuple[LARNNCarry, jax.Array]:
        """``inputs`` ``(T, B, D)`` → the carry after each sequence's last step (``seq_lengths``)
        and the outputs ``(T, B, H)``."""
        cell = self.cell
        steps = inputs.shape[0]
        if initial_carry is None:
            key = init_key if init_key is not None else jax.random.key(0)
            initial_carry = cell.initialize_carry(key, inputs.shape[1:])
        if self.is_initializing():  # the cell's own step creates every variable the scan reads
            cell(initial_carry, inputs[0])
        variables = cell.variables
        stats = variables.get("batch_stats", {})
        training = not cell.deterministic
        if cell.draws_dropout:  # two keys per step: the entering entry's, and the rest's
            base = self.make_rng("dropout")
            keys = jax.random.key_data(jax.random.split(base, (steps + 1, 2)))
            impl = jax.random.key_impl(base)

            def wrap_key(data: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
                enter_key, advance_key = jax.random.wrap_key_data(data, impl=impl)
                return enter_key, advance_key

        else:
            keys = jnp.zeros((steps + 1,), jnp.uint32)

            def wrap_key(data: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
                return None, None

        if self.native:  # the input terms are computed step by step, natively
            _check_input(inputs[0], initial_carry.h, cell.query, other=cell.features)
            outputs, final, stats_after = native_layer.run(
                cell,
                variables["params"],
                stats,
                initial_carry,
                inputs,
                native_layer.mask_keys(cell, keys, impl) if cell.draws_dropout else None,
                _last_steps(steps, initial_carry.h.shape[0], seq_lengths),
            )
            if stats and training:
                _put_collection(cell, "batch_stats", stats_after)
            return final, outputs
        terms = cell.input_terms(inputs)  # (T, B, ·): one product for the whole sequence
        enter, step_over_window = _pure_step(cell.clone(parent=None), bool(stats) and training)
        result = window_scan(
            StepFunction(enter, step_over_window, wrap_key),
            variables["params"],
            stats,
            initial_carry.h,
            initial_carry.c,
            initial_carry.window,
            terms,
            keys,
        )
        if stats and training:
            _put_collection(cell, "batch_stats", result.stats)
        return _final_carry(result, initial_carry, seq_lengths), result.outputs


def _pure_step(
    cell: LARNNCell, updates_statistics: bool
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``StepFunction.enter`` and ``StepFunction.step_over_window`` for an unbound ``cell``."""

    def variables(params, stats):
        return {"params": params, "batch_stats": stats} if stats else {"params": params}

    def rngs(key):
        return {"dropout": key} if key is not None else None

    def enter(params, c, key):
        return cell.apply(variables(params, {}), c, method=LARNNCell.enter, rngs=rngs(key))

    def step_over_window(params, stats, h, c, window, sums, terms, key):
        args = (variables(params, stats), h, c, window, sums, terms)
        method = LARNNCell.step_over_window
        if not updates_statistics:
            return cell.apply(*args, method=method, rngs=rngs(key)), stats
        outputs, updates = cell.apply(*args, method=method, rngs=rngs(key), mutable=["batch_stats"])
        return outputs, updates["batch_stats"]

    return enter, step_over_window


def _last_steps(steps: int, batch: int, seq_lengths: jax.Array | None) -> jax.Array:
    """``(B,)``: each sequence's last step, ``seq_lengths - 1`` (or ``T - 1``)."""
    if seq_lengths is None:
        return jnp.full((batch,), steps - 1, jnp.int32)
    return jnp.asarray(seq_lengths, jnp.int32) - 1


def _final_carry(
    result: ScanResult, initial: LARNNCarry, seq_lengths: jax.Array | None
) -> LARNNCarry:
    """The carry after each sequence's last step (``seq_lengths - 1``, or the last step)."""
    steps = result.outputs.shape[0]
    batch = initial.h.shape[0]
    last = _last_steps(steps, batch, seq_lengths)
    rows = jnp.arange(batch)
    stays = initial.window.key_entries.shape[-2]  # k - 1

    def newest_entries(buffer: jax.Array) -> jax.Array:
        """Each sample's ``k - 1`` newest entries after its last step, ``(B, k-1, H)``."""
        return jax.vmap(lambda entries, t: jax.lax.dynamic_slice_in_dim(entries, steps - t, stays))(
            buffer, last
        )

    window = WindowState(
        newest_entries(result.key_buffer),
        newest_entries(result.value_buffer),
        jnp.minimum(initial.window.count + last + 1, stays),
        result.moment_sums[last, rows],
    )
    return LARNNCarry(
        result.outputs[last, rows].astype(initial.h.dtype), result.cells[last, rows], window
    )


def _put_collection(module: nn.Module, collection: str, tree: PyTree) -> None:
    """Writes ``tree`` (nested by submodule names) into ``module``'s ``collection``."""
    for name, value in tree.items():
        if isinstance(value, dict):
            _put_collection(getattr(module, name), collection, value)
        else:
            module.put_variable(collection, name, value)
