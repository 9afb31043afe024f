"""Multi-head attention of one query per sample over the LARNN window: the per-head arithmetic.

Shapes: batch ``B`` (any number of leading axes), window ``k``, features ``H``, heads ``n``,
head size ``d_k = H / n``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from larnn_jax.window import AffineEntries, from_head_minor, to_head_minor


def head_sums(x: jax.Array, num_heads: int) -> jax.Array:
    """``(..., H)`` in head-minor order → ``(..., n)``: each head's sum over its features."""
    return jnp.sum(x.reshape(*x.shape[:-1], -1, num_heads), axis=-2)


def spread_over_heads(w: jax.Array, features: int) -> jax.Array:
    """``(..., n)`` per-head values → ``(..., H)`` in head-minor order: each head's value on each
    of its features."""
    return jnp.tile(w, features // w.shape[-1])


def multi_head_attention(
    query: jax.Array,
    keys: AffineEntries,
    values: AffineEntries,
    mask: jax.Array,
    weight_dropout: jax.Array | None,
    num_heads: int,
) -> jax.Array:
    """``concat_h Σ_j α_j V_j``, ``α = softmax_j(<q_h, K_j,h> / √d_k)`` over the valid entries.

    Args:
      query: ``(B, H)`` in the natural feature order (head ``h`` owns features
        ``h·d_k … (h+1)·d_k - 1``).
      keys, values: the window's ``K = E_K·s_K + t_K`` and ``V = E_V·s_V + t_V``
        (:class:`~larnn_jax.window.AffineEntries`), in head-minor order.
      mask: ``(B, k)`` boolean, the valid entries (at least one per sample).
      weight_dropout: ``(B, k, n)`` dropout factors of the weights, or ``None``.
      num_heads: ``n``.

    Returns:
      ``(B, H)`` in the natural order. The normalisations are folded in: ``<q, K_j> = <q·s_K,
      E_K,j> + <q, t_K>``, whose second term is the same for every entry and cancels in the
      softmax, and ``Σ_j α_j V_j = (Σ_j α_j E_V,j)·s_V + (Σ_j α_j)·t_V``.
    """
    scaled_query = to_head_minor(query, num_heads) * jnp.asarray(keys.scale, query.dtype)
    factors = jnp.ones((), keys.entries.dtype) if weight_dropout is None else weight_dropout
    context, weight_total = window_attention(
        scaled_query, keys.entries, values.entries, mask, factors, num_heads
    )
    return from_head_minor(context * values.scale + weight_total * values.shift, num_heads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def window_attention(
    query: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    weights_scale: jax.Array,
    num_heads: int,
) -> tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention of one query per sample over its window, per head.

    Every feature axis is in head-minor order (:func:`head_minor_order`).

    Args:
      query: ``(B, H)``.
      keys: ``(B, k, H)``.
      values: ``(B, k, H)``.
      mask: ``(B, k)`` boolean, true for valid window entries (at least one per sample).
      weights_scale: multiplies the attention weights after the softmax, broadcast to
        ``(B, k, n)``: ``1`` or an inverted-dropout mask ``keep / (1 - rate)``.
      num_heads: ``n``.

    Returns:
      ``context``, ``(B, H)``: for each head, ``Σ_j α_j V_j`` over its features; and
      ``weight_total``, ``(B, H)``: ``Σ_j α_j`` of each feature's head (one, unless dropout
      rescaled the weights). Callers that normalise values with an affine map ``V = E·s + t``
      recover ``Σ_j α_j V_j = context·s + weight_total·t`` from the raw ``E``.

    The gradient is written by hand (``jax.custom_vjp``) so that differentiating a scan over
    time steps stores only the inputs and the ``(B, k, n)`` weights of each step, not the
    ``(B, k, H)`` intermediates that automatic differentiation would keep.
    """
    return _attention_forward(query, keys, values, mask, weights_scale, num_heads)[0]


def _attention_forward(query, keys, values, mask, weights_scale, num_heads):
    """The forward pass; returns the outputs and what the backward pass needs."""
    features = query.shape[-1]
    scale = 1.0 / np.sqrt(features // num_heads)
    # The scale goes on the query, so that the scores are the head sums as they are: a
    # multiplication after them would let XLA recompute them, fused with an FMA, in the softmax's
    # `scores - max`; at scores of 1e9 that rounds to ±100 and exp overflows (NaN weights).
    scaled_query = query * jnp.asarray(scale, query.dtype)
    scores = head_sums(scaled_query[..., None, :] * keys, num_heads)  # (B, k, n)
    softmax_dtype = jnp.result_type(jnp.float32, scores.dtype)  # float32 or wider
    scores = jnp.where(mask[..., None], scores.astype(softmax_dtype), -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-2).astype(values.dtype)  # (B, k, n)
    kept = weights * weights_scale
    context = jnp.sum(spread_over_heads(kept, features) * values, axis=-2)
    weight_total = spread_over_heads(jnp.sum(kept, axis=-2), features)
    return (context, weight_total), (query, keys, values, weights_scale, weights)


def _attention_backward_rule(num_heads, residuals, cotangents):
    """Cotangents of ``query``, ``keys``, ``values`` (and none for ``mask``, ``weights_scale``)."""
    query, keys, values, weights_scale, weights = residuals
    d_context, d_weight_total = cotangents
    features = query.shape[-1]
    scale = 1.0 / np.sqrt(features // num_heads)
    kept = weights * weights_scale
    d_values = spread_over_heads(kept, features) * d_context[..., None, :]
    d_kept = head_sums(values * d_context[..., None, :], num_heads)
    d_kept = d_kept + head_sums(d_weight_total, num_heads)[..., None, :]
    d_weights = d_kept * weights_scale
    # Softmax: ds_j = α_j (dα_j - Σ_i α_i dα_i); masked entries have α = 0.
    d_scores = weights * (d_weights - jnp.sum(weights * d_weights, axis=-2, keepdims=True))
    d_products = spread_over_heads(d_scores * jnp.asarray(scale, keys.dtype), features)
    d_query = jnp.sum(d_products * keys, axis=-2)
    d_keys = d_products * query[..., None, :]
    d_scale = jnp.zeros_like(weights_scale) if weights_scale.ndim else None
    return d_query, d_keys, d_values, None, d_scale


window_attention.defvjp(_attention_forward, _attention_backward_rule)
