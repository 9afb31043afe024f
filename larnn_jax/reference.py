"""The LARNN cell as ``docs/model.md`` §1 defines it, with none of §2's savings: the reference.

:class:`ReferenceLARNNCell` is :class:`larnn_jax.LARNNCell` with the same attributes, submodules
and variables (``LARNNCell``'s variables apply to it unchanged and give the same results to float
rounding), but its step is the definition taken literally:

* the window holds the ``k`` most recent raw (key/value-dropped) cell states;
* every step projects every entry of the window to a key and a value again (with the projected
  positional encoding and ``norm ∘ elu``), normalises the whole ``(B, k, H)`` keys and values with
  statistics over the valid entries, and attends head by head in the natural feature order.

It costs ``O(k·H²)`` per sample and step instead of ``O(H² + k·H)``. Read it for the model; the
tests check ``LARNNCell`` and every scan against it, and the benchmarks time it (``larnn_naive``).
Its step is its own, so the fused scans do not run it: ``scan='auto'`` scans it plainly.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.typing import PRNGKey

from larnn_jax.cell import InputTerms, LARNNCell, apply_dropout
from larnn_jax.window import positional_encoding, valid_mask


class ReferenceCarry(NamedTuple):
    """The state a :class:`ReferenceLARNNCell` carries from one step to the next.

    Attributes:
      h: ``(B, H)``, ``h_{t-1}``.
      c: ``(B, H)``, ``c_{t-1}`` (it enters the window at step ``t``).
      window: ``(B, k-1, H)``, the raw, key/value-dropped states ``c_{t-2} … c_{t-k}``, newest
        first, zeros where not yet filled.
      count: ``(B,)`` int32, how many of them are filled.
    """

    h: jax.Array
    c: jax.Array
    window: jax.Array
    count: jax.Array  # type: ignore[assignment]  # a field named like the method tuple.count


class ReferenceLARNNCell(LARNNCell):
    """:class:`larnn_jax.LARNNCell`'s step as the definition writes it (see the module docstring)."""

    @classmethod
    def twin(cls, cell: nn.RNNCellBase) -> ReferenceLARNNCell:
        """The reference cell with every attribute of the LARNN ``cell`` (unbound, unnamed).

        Raises:
            TypeError: ``cell`` is not a :class:`~larnn_jax.LARNNCell`.
        """
        if not isinstance(cell, LARNNCell):
            raise TypeError(f"the reference cell twins a LARNNCell, not a {type(cell).__name__}")
        fields = {
            field.name: getattr(cell, field.name)
            for field in dataclasses.fields(cell)
            if field.init and field.name not in ("parent", "name")
        }
        return cls(**fields)

    # The reference cell carries the raw window (ReferenceCarry), not LARNNCarry's entries.
    def initialize_carry(  # type: ignore[override]
        self, rng: PRNGKey, input_shape: tuple[int, ...]
    ) -> ReferenceCarry:
        """The zero carry for inputs ``(*batch, D)``; also creates the normalisation statistics."""
        carry = super().initialize_carry(rng, input_shape)
        return ReferenceCarry(carry.h, carry.c, carry.window.key_entries, carry.window.count)

    def step(  # type: ignore[override]
        self, carry: ReferenceCarry, terms: InputTerms
    ) -> tuple[ReferenceCarry, jax.Array]:
        """One time step from its input terms: the carry after step ``t`` and ``h_t`` ``(B, H)``."""
        batch, dtype = carry.h.shape[:-1], carry.h.dtype
        running = self.deterministic
        # c_{t-1} enters the window, key/value-dropped: c_{t-1} … c_{t-k}          (B, k, H)
        entering = apply_dropout(carry.c, self.entry_dropout(batch, dtype))
        window = jnp.concatenate([entering[..., None, :], carry.window], axis=-2)
        count = jnp.minimum(carry.count + 1, self.window_size)
        mask = valid_mask(count, self.window_size)  # (B, k)
        dropout = self.step_dropout(batch, dtype)
        # q = elu(W_q [x_t ; h_{t-1}] + b_q)                                         (B, H)
        query = jax.nn.elu(terms.query + self.query(None, carry.h))
        # K_j = norm(act(W_k [c_j ; pe(j)] + b_k)), V_j likewise, j = 1 … k          (B, k, H)
        keys = self.key_norm(self.projected(window, "key"), mask, use_running_average=running)
        values = self.value_norm(self.projected(window, "value"), mask, use_running_average=running)
        # α_j = softmax_j(<q_h, K_j,h> / √d_k) over the valid entries, per head h     (B, k, n)
        heads = (*batch, self.num_heads, self.features // self.num_heads)
        scores = jnp.einsum(
            "...hd,...jhd->...jh", query.reshape(heads), keys.reshape(*batch, -1, *heads[-2:])
        ) / np.sqrt(heads[-1])
        softmax_dtype = jnp.result_type(jnp.float32, scores.dtype)  # float32 or wider
        scores = jnp.where(mask[..., None], scores.astype(softmax_dtype), -jnp.inf)
        weights = apply_dropout(jax.nn.softmax(scores, axis=-2).astype(dtype), dropout.attention)
        # a_t = BN_a(elu(W_o concat_h(Σ_j α_j V_j) + b_o))                          (B, H)
        context = jnp.einsum(
            "...jh,...jhd->...hd", weights, values.reshape(*batch, -1, *heads[-2:])
        ).reshape(*batch, self.features)
        a = self.attention_norm(
            jax.nn.elu(self.attention_output(context)), use_running_average=running
        )
        # z = W_x x_t + W_h h_{t-1} + W_a a_t + b   (or W [x_t ; h_{t-1} ; a_t] + b)  (B, 4H)
        z = terms.gates + self.recurrent_gate_terms(carry.h, a)
        # c_t = f ⊙ c_{t-1} + i ⊙ g,  h_t = BN_h(o ⊙ elu(BN_c(c_t)))                  (B, H) each
        c, h = self.update(z, carry.c, dropout.output)
        new_carry = ReferenceCarry(
            h.astype(dtype),
            c.astype(dtype),
            window[..., :-1, :],
            jnp.minimum(count, self.window_size - 1),
        )
        return new_carry, h

    def projected(self, states: jax.Array, kind: str) -> jax.Array:
        """``act(W [c_j ; pe(j)] + b)`` ``(B, k, H)`` for the raw states ``(B, k, H)`` of the
        window (``act``: ``elu`` with ``activation_on_keys_and_values``, else the identity)."""
        projection = self.key if kind == "key" else self.value
        projected = projection(states)
        if self.use_positional_encoding:
            position = self.key_position if kind == "key" else self.value_position
            table = positional_encoding(self.window_size, projected.dtype)
            projected = projected + position(jnp.asarray(table))
        return jax.nn.elu(projected) if self.activation_on_keys_and_values else projected
