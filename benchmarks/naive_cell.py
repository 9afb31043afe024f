"""The LARNN cell computed the naive way, kept only as a baseline for benchmarks and tests.

:class:`NaiveLARNNCell` is :class:`larnn_jax.LARNNCell` (same attributes, same submodules, same
parameter tree and variable names, so ``LARNNCell``'s variables apply to it unchanged) with the
window handled as docs/model.md §1 writes it, without any of §2's savings:

* the window holds the raw (key/value-dropped) cell states, ``(B, k, H)``;
* every step re-projects all ``k`` entries to keys and values (adding the projected positional
  encoding and ``elu``) and normalises the whole ``(B, k, H)`` keys and values (batch norm with
  statistics over the valid entries), instead of folding the normalisation into the query and
  the output and taking the statistics from carried sums.

Everything else is the library's own, inherited: the query, the attention and its per-head sums
(docs/model.md §2), the dropout, the gates and the LSTM update. A timing comparison with ``LARNNCell``
therefore measures the window handling alone.

The library's fused scan (``LARNNLayer(scan='fused')``) runs ``LARNNCell``'s own window, so the
naive cell runs under the plain scan, :data:`SCAN`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax.typing import PRNGKey

from larnn_jax import LARNNCell
from larnn_jax.cell import InputTerms
from larnn_jax.window import WindowScheme, WindowView, valid_mask

#: The scan of ``LARNNLayer`` (and ``LARNN``, ``SequenceClassifier``) for a naive cell.
SCAN = "plain"


class NaiveCarry(NamedTuple):
    """The state a :class:`NaiveLARNNCell` carries from one step to the next.

    Before step ``t``: ``h = h_{t-1}``, ``c = c_{t-1}`` (both ``(B, H)``), ``window`` the raw,
    key/value-dropped older entries ``c_{t-2} … c_{t-k}`` (``(B, k-1, H)``, newest first, zeros
    where not yet filled) and ``length`` (``(B,)`` int32) how many of them are filled.
    """

    h: jax.Array
    c: jax.Array
    window: jax.Array
    length: jax.Array


class NaiveLARNNCell(LARNNCell):
    """:class:`larnn_jax.LARNNCell` with a raw window re-projected and re-normalised every step.

    Costs ``O(k·H²)`` per sample and step instead of ``O(H² + k·H)``; gives the same results as
    ``LARNNCell`` on the same variables (up to float rounding). See the module docstring.
    """

    @property
    def scheme(self) -> WindowScheme:
        """``LARNNCell``'s scheme without its savings: the window's keys and values are
        normalised as they are, with statistics taken over them at every step."""
        return dataclasses.replace(super().scheme, carries_moments=False, folds_batch_norm=False)

    def initialize_carry(self, rng: PRNGKey, input_shape: tuple[int, ...]) -> NaiveCarry:
        """The zero carry for inputs ``(*batch, D)``; also creates the normalisation statistics."""
        carry = super().initialize_carry(rng, input_shape)
        return NaiveCarry(carry.h, carry.c, carry.window.key_entries, carry.window.count)

    def entries(self, c: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The window keeps a cell state ``c`` as it is (for keys and values alike): its
        projections are made again at every step (:meth:`step`)."""
        return c, c

    def step(self, carry: NaiveCarry, terms: InputTerms) -> tuple[NaiveCarry, jax.Array]:
        """One time step from its input terms: the carry after step ``t`` and ``h_t`` ``(B, H)``."""
        entering, _ = self.enter(carry.c)  # c_{t-1}, key/value-dropped            (B, H)
        window = jnp.concatenate([entering[..., None, :], carry.window], axis=-2)  # (B, k, H)
        length = jnp.minimum(carry.length + 1, self.window_size)
        # Every entry projected again, as LARNNCell projects an entering one.   (B, k, H) each
        keys, values = super().entries(window)
        view = WindowView(keys, values, valid_mask(length, self.window_size), length)
        no_sums = jnp.zeros((*carry.h.shape[:-1], 0, self.features), carry.h.dtype)
        h, c, _ = self.step_over_window(carry.h, carry.c, view, no_sums, terms)
        dtype = carry.h.dtype
        new_carry = NaiveCarry(
            h=h.astype(dtype),
            c=c.astype(dtype),
            window=window[..., :-1, :].astype(dtype),
            length=jnp.minimum(length, self.window_size - 1),
        )
        return new_carry, h


def naive_twin(cell: LARNNCell) -> NaiveLARNNCell:
    """A :class:`NaiveLARNNCell` with every attribute of ``cell`` (unbound, unnamed)."""
    fields = {
        field.name: getattr(cell, field.name)
        for field in dataclasses.fields(cell)
        if field.init and field.name not in ("parent", "name")
    }
    return NaiveLARNNCell(**fields)
