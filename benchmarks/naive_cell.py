"""The LARNN cell computed the naive way, kept only as a baseline for benchmarks and tests.

:class:`NaiveLARNNCell` is :class:`larnn_jax.LARNNCell` (same attributes, same submodules, same
parameter tree and variable names, so ``LARNNCell``'s variables apply to it unchanged) with the
window handled as SPEC §1 writes it, without any of SPEC §2's savings:

* the window holds the raw (key/value-dropped) cell states, ``(B, k, H)``;
* every step re-projects all ``k`` entries to keys and values (adding the projected positional
  encoding), applies ``elu`` and normalises the whole ``(B, k, H)`` keys and values (batch norm
  with statistics over the valid entries);
* the attention then runs on the normalised window.

The query, the gates and the LSTM update are the library's own (inherited), and the per-head
sums are products with a fixed ``(H, heads)`` 0/1 matrix as in the library (SPEC §2b), so that
a timing comparison with ``LARNNCell`` measures the window handling alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import PRNGKey

from larnn_jax import LARNNCell, positional_encoding
from larnn_jax.models import SequenceClassifier


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


def head_membership(features: int, num_heads: int) -> np.ndarray:
    """``(H, n)`` 0/1 matrix, ``M[f, h] = 1`` where feature ``f`` belongs to head ``h``.

    Heads are contiguous blocks of ``H / n`` features: ``x @ M`` sums each head's features and
    ``w @ M.T`` repeats a per-head value over its features.
    """
    head_size = features // num_heads
    return np.kron(np.eye(num_heads), np.ones((head_size, 1)))


def attend_window(
    query: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    num_heads: int,
    weights_dropout: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """Per-head softmax attention of ``query`` ``(B, H)`` over ``keys``/``values`` ``(B, k, H)``.

    Scores ``<q_h, K_j,h> / sqrt(d_k)``, softmax over the entries where ``mask`` ``(B, k)`` is
    true (in float32 or wider), ``weights_dropout`` on the ``(B, k, n)`` weights; returns
    ``concat_h Σ_j α_j V_j,h``, ``(B, H)``.
    """
    features = query.shape[-1]
    membership = jnp.asarray(head_membership(features, num_heads), keys.dtype)
    scores = (keys * query[..., None, :]) @ membership / np.sqrt(features // num_heads)
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    weights = jax.nn.softmax(jnp.where(mask[..., None], scores, -jnp.inf), axis=-2)
    weights = weights_dropout(weights.astype(values.dtype))
    return jnp.sum((weights @ membership.T) * values, axis=-2)


class NaiveLARNNCell(LARNNCell):
    """:class:`larnn_jax.LARNNCell` with a raw window re-projected and re-normalised every step.

    Costs ``O(k·H²)`` per sample and step instead of ``O(H² + k·H)``; gives the same results as
    ``LARNNCell`` on the same variables (up to float rounding). See the module docstring.
    """

    def initialize_carry(self, rng: PRNGKey, input_shape: tuple[int, ...]) -> NaiveCarry:
        """The zero carry for inputs ``(*batch, D)``; also creates the normalisation statistics."""
        cached = super().initialize_carry(rng, input_shape)
        return NaiveCarry(cached.h, cached.c, cached.keys, cached.length)

    def _drop(self, rate: float, x: jax.Array) -> jax.Array:
        """Inverted dropout (rng stream ``'dropout'``) in training; the identity otherwise."""
        if rate == 0.0 or self.deterministic:
            return x
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

    def _window_activations(self, window: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        """Raw window ``(B, k, H)`` → normalised keys and values ``(B, k, H)``, all recomputed."""
        running = self.deterministic
        keys = self.key(window)
        values = self.value(window)
        if self.use_positional_encoding:
            encoding = jnp.asarray(positional_encoding(self.window_size, window.dtype))
            keys = keys + self.key_position(encoding)
            values = values + self.value_position(encoding)
        if self.activation_on_keys_and_values:
            keys = jax.nn.elu(keys)
            values = jax.nn.elu(values)
        # key_norm/value_norm are the identity when the window is not normalised.
        keys = self.key_norm(keys, mask, use_running_average=running)
        values = self.value_norm(values, mask, use_running_average=running)
        return keys, values

    def __call__(self, carry: NaiveCarry, x: jax.Array) -> tuple[NaiveCarry, jax.Array]:
        """One time step: ``x`` ``(B, D)`` → (the carry after step ``t``, ``h_t`` ``(B, H)``)."""
        dtype = carry.h.dtype
        entering = self._drop(self.kv_dropout_rate, carry.c)
        window = jnp.concatenate([entering[..., None, :], carry.window], axis=-2)  # (B, k, H)
        length = jnp.minimum(carry.length + 1, self.window_size)
        mask = jnp.arange(self.window_size) < length[..., None]  # (B, k)

        keys, values = self._window_activations(window, mask)
        query = jax.nn.elu(self.query(jnp.concatenate([x, carry.h], axis=-1)))
        context = attend_window(
            query,
            keys,
            values,
            mask,
            self.num_heads,
            lambda weights: self._drop(self.attention_dropout_rate, weights),
        )
        a = self.attention_norm(
            jax.nn.elu(self.attention_output(context.astype(keys.dtype))),
            use_running_average=self.deterministic,
        )
        c, h = self.update(self.gate_preactivation(x, carry.h, a), carry.c)
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


class NaiveSequenceClassifier(SequenceClassifier):
    """:class:`larnn_jax.models.SequenceClassifier` (``block='larnn'``) with the naive cell.

    Same variables as the ``SequenceClassifier`` of the same attributes.
    """

    def make_cell(self) -> NaiveLARNNCell:
        """The naive twin of the cell that ``SequenceClassifier`` would build."""
        cell = super().make_cell()
        if not isinstance(cell, LARNNCell):
            raise ValueError(f"the naive classifier needs block='larnn', got {self.block!r}")
        return naive_twin(cell)
