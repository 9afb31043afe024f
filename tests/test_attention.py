"""The hand-written gradient of the window attention equals automatic differentiation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larnn_jax.attention import (
    _attention_forward,
    head_sums,
    spread_over_heads,
    window_attention,
)
from larnn_jax.window import head_minor_order

B, K, H = 3, 5, 6


@pytest.mark.parametrize(
    ("num_heads", "with_dropout"), [(2, False), (3, True), (6, True), (1, False)]
)
def test_gradient_matches_autodiff(num_heads, with_dropout):
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(0), 6)
        query = jax.random.normal(keys[0], (B, H), jnp.float64)
        window_keys = jax.random.normal(keys[1], (B, K, H), jnp.float64)
        window_values = jax.random.normal(keys[2], (B, K, H), jnp.float64)
        mask = jnp.arange(K)[None, :] < jnp.array([[1], [3], [K]])  # partly filled windows
        scale = (
            jax.random.bernoulli(keys[3], 0.7, (B, K, num_heads)) / 0.7
            if with_dropout
            else jnp.ones(())
        ).astype(jnp.float64)
        cotangents = (
            jax.random.normal(keys[4], (B, H), jnp.float64),
            jax.random.normal(keys[5], (B, H), jnp.float64),
        )

        def reference(q, k, v):
            return _attention_forward(q, k, v, mask, scale, num_heads)[0]

        def custom(q, k, v):
            return window_attention(q, k, v, mask, scale, num_heads)

        out_ref, vjp_ref = jax.vjp(reference, query, window_keys, window_values)
        out, vjp = jax.vjp(custom, query, window_keys, window_values)
        for got, want in zip(out + vjp(cotangents), out_ref + vjp_ref(cotangents), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        # Entries outside the window get no gradient.
        d_keys = vjp(cotangents)[1]
        assert not np.any(np.asarray(d_keys)[~np.asarray(mask)])


def test_heads_partition_the_features():
    """Head ``h`` owns features ``2h, 2h + 1`` (``d_k = 2``); in head-minor order they are at
    positions ``h`` and ``3 + h``, and the head sums and spreads agree with that."""
    order = head_minor_order(6, 3)
    np.testing.assert_array_equal(order, [0, 2, 4, 1, 3, 5])
    x = np.arange(12.0).reshape(2, 6)  # natural order
    np.testing.assert_array_equal(head_sums(x[:, order], 3), x.reshape(2, 3, 2).sum(-1))
    w = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(
        spread_over_heads(w, 6)[:, np.argsort(order)], [[1, 1, 2, 2, 3, 3]]
    )
    np.testing.assert_array_equal(head_minor_order(4, 4), np.arange(4))  # d_k = 1
    np.testing.assert_array_equal(head_minor_order(5, 1), np.arange(5))  # one head


def test_window_moments_gradient_matches_autodiff():
    from larnn_jax.normalization import _weighted_moments, _weighted_moments_forward

    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (B, K, H), jnp.float64) * 2 + 1
        weight = (jnp.arange(K)[None, :, None] < jnp.array([[[1]], [[3]], [[K]]])).astype(x.dtype)
        cotangents = (jnp.linspace(-1, 1, H), jnp.linspace(2, -1, H))
        out, vjp = jax.vjp(lambda x: _weighted_moments(x, weight), x)
        _, vjp_ref = jax.vjp(lambda x: _weighted_moments_forward(x, weight)[0], x)
        valid = np.asarray(x)[np.asarray(weight[..., 0]) > 0]
        np.testing.assert_allclose(out[0], valid.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(out[1], valid.var(axis=0), rtol=1e-12)
        np.testing.assert_allclose(
            vjp(cotangents)[0], vjp_ref(cotangents)[0], rtol=1e-10, atol=1e-12
        )
