"""The fused window scan (``LARNNLayer``'s default) against automatic differentiation.

Its gradient is written by hand (``larnn_jax/scans/window_scan.py``): the backward pass re-slices
every step's window from a buffer of the entries. Here, in float64, it must equal what automatic
differentiation gives through the plain scan (``nn.RNN``) for every option of the cell and of
the call: the outputs and the final carry (``h``, ``c``, the window's entries and moment sums)
enter the loss, and the gradient is taken with respect to the parameters, the inputs and the
initial carry. With dropout the fused scan draws other masks than ``nn.RNN``, so there the
reference is automatic differentiation through the fused scan's own forward pass.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cell_cases import assert_close_trees

from larnn_jax import LARNNCell, LARNNLayer
from larnn_jax.scans import window_scan

B, T, D, H = 3, 9, 4, 6
RTOL = 1e-6


def make_cell(**options) -> LARNNCell:
    defaults = dict(features=H, num_heads=2, window_size=3, param_dtype=jnp.float64)
    return LARNNCell(**{**defaults, **options})


def loss_and_gradients(layer: nn.Module, variables, x, train: bool, **call):
    """``(loss, ∂loss/∂(params, x, initial carry))``: a loss of every output and carry part."""
    cell = layer.cell if isinstance(layer, LARNNLayer) else layer.forward_rnn.cell
    batch_shape = x[0].shape if call.get("time_major") else x[:, 0].shape
    initial = cell.initialize_carry(jax.random.key(0), batch_shape)
    rng = np.random.default_rng(5)
    initial = jax.tree.map(
        lambda a: jnp.asarray(rng.normal(size=a.shape)) if a.dtype == jnp.float64 else a, initial
    )
    kept = initial.window.key_entries.shape[-2]
    count = jnp.minimum(jnp.arange(B, dtype=jnp.int32), kept)  # partly filled windows
    initial = initial._replace(window=initial.window._replace(count=count))

    def loss(params, x, initial):
        kwargs = (
            dict(initial_carry=initial, deterministic=not train)
            if isinstance(layer, LARNNLayer)
            else {}  # nn.Bidirectional: the cells' own mode
        )
        (carry, y), _ = layer.apply(
            {**variables, "params": params},
            x,
            return_carry=True,
            rngs={"dropout": jax.random.key(7)},
            mutable=["batch_stats"],
            **kwargs,
            **call,
        )
        weights = jnp.linspace(0.5, 1.5, y.size).reshape(y.shape)
        parts = [jnp.sum(jnp.sin(y) * weights)]
        parts += [
            jnp.sum(jnp.cos(leaf)) for leaf in jax.tree.leaves(carry) if leaf.dtype.kind == "f"
        ]
        return sum(parts)

    return jax.value_and_grad(loss, argnums=(0, 1, 2), allow_int=True)(
        variables["params"], x, initial
    )


def assert_same(got, want):
    """Within ``RTOL`` (a gradient that is zero but for rounding: of 1e-6 of the largest)."""
    assert_close_trees(got, want, RTOL, zero_floor=1e-6)


def compare(cell: LARNNCell, train: bool = True, x_shape=(B, T, D), **call) -> None:
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), x_shape, jnp.float64)
        fused, plain = LARNNLayer(cell, scan="fused"), LARNNLayer(cell, scan="plain")
        variables = plain.init(jax.random.key(2), x)
        variables = jax.tree.map(  # away from the trivial initial values
            lambda a: a + 0.2 * jax.random.normal(jax.random.key(3), a.shape, a.dtype), variables
        )
        value, grads = jax.jit(lambda v, x: loss_and_gradients(fused, v, x, train, **call))(
            variables, x
        )
        want_value, want_grads = jax.jit(
            lambda v, x: loss_and_gradients(plain, v, x, train, **call)
        )(variables, x)
        np.testing.assert_allclose(value, want_value, rtol=1e-12)
        assert_same(grads, want_grads)


CELLS = {
    "residual": dict(),
    "layer-pe": dict(mode="layer", use_positional_encoding=True),
    "noact": dict(activation_on_keys_and_values=False),
    "noact-pe": dict(activation_on_keys_and_values=False, use_positional_encoding=True),
    "layer-norm": dict(norm="layer"),
    "no-norm-pe": dict(norm="none", use_positional_encoding=True),
    "carried": dict(cell_norm_placement="carried"),
    "window1": dict(window_size=1),
    "window1-pe": dict(window_size=1, use_positional_encoding=True),
    "one-head": dict(num_heads=1, window_size=4),
}


#: The cases of the default suite; the slow suite runs every cell in both modes.
FAST = {("residual", True), ("layer-pe", True), ("carried", False)}


@pytest.mark.parametrize(
    ("name", "train"),
    [
        pytest.param(name, train, marks=() if (name, train) in FAST else pytest.mark.slow)
        for name in CELLS
        for train in (True, False)
    ],
)
def test_gradient_equals_autodiff_through_the_plain_scan(name, train):
    compare(make_cell(**CELLS[name]), train)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(dict(seq_lengths=jnp.array([T, 4, 1])), marks=pytest.mark.slow),
        pytest.param(dict(reverse=True), marks=pytest.mark.slow),
        dict(reverse=True, keep_order=True, seq_lengths=jnp.array([2, T, 5])),
    ],
    ids=["seq_lengths", "reverse", "reverse-keep_order-seq_lengths"],
)
def test_gradient_with_call_options(call):
    compare(make_cell(), True, **call)


@pytest.mark.slow
def test_time_major():
    compare(make_cell(use_positional_encoding=True), True, x_shape=(T, B, D), time_major=True)


@pytest.mark.slow
def test_bidirectional():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (B, T, D), jnp.float64)

        def bidirectional(scan: str) -> nn.Bidirectional:
            cell = make_cell(deterministic=False)
            return nn.Bidirectional(LARNNLayer(cell, scan=scan), LARNNLayer(cell, scan=scan))

        variables = bidirectional("plain").init(jax.random.key(2), x)
        got = jax.jit(lambda v: loss_and_gradients(bidirectional("fused"), v, x, True))(variables)
        want = jax.jit(lambda v: loss_and_gradients(bidirectional("plain"), v, x, True))(variables)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        assert_same(got[1][:2], want[1][:2])  # the initial carry is not an argument here


@pytest.mark.parametrize(
    "options",
    [
        dict(dropout_rate=0.3, kv_dropout_rate=0.3, attention_dropout_rate=0.3),
        pytest.param(
            dict(kv_dropout_rate=0.4, use_positional_encoding=True, mode="layer"),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["all-dropouts", "kv-dropout-pe"],
)
def test_gradient_with_dropout_equals_autodiff_through_the_same_forward(options, monkeypatch):
    """Dropout masks are the fused scan's own: the reference differentiates its forward pass."""
    cell = make_cell(**options)
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (B, T, D), jnp.float64)
        layer = LARNNLayer(cell, scan="fused")
        variables = layer.init(jax.random.key(2), x)
        got = jax.jit(lambda v: loss_and_gradients(layer, v, x, True))(variables)
        monkeypatch.setattr(window_scan, "_window_scan", window_scan._forward)
        want = jax.jit(lambda v: loss_and_gradients(layer, v, x, True))(variables)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    assert_same(got[1], want[1])
    # The masks are really drawn: without dropout the loss differs.
    without = {name: value for name, value in options.items() if "dropout" not in name}
    with jax.enable_x64(True):
        value_without, _ = jax.jit(
            lambda v: loss_and_gradients(LARNNLayer(make_cell(**without), scan="fused"), v, x, True)
        )(variables)
    assert not np.isclose(value_without, got[0])
