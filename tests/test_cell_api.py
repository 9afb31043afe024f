"""The cells and layers work in every way a Flax user will try them, and fail clearly otherwise."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larnn_jax import LARNN, BNLSTMCell, LARNNCarry, LARNNCell, LARNNLayer
from larnn_jax.window import head_minor_order

B, T, D, H, HEADS, K = 3, 9, 5, 6, 2, 3
TRAIN_SCAN = dict(variable_carry="batch_stats", split_rngs={"params": False, "dropout": True})
EVAL_SCAN = dict(variable_broadcast=("params", "batch_stats"))
DROPOUTS = dict(dropout_rate=0.2, kv_dropout_rate=0.2, attention_dropout_rate=0.2)


def make_inputs(shape=(B, T, D), seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def larnn_cell(**overrides) -> LARNNCell:
    return LARNNCell(**{"features": H, "num_heads": HEADS, "window_size": K, **overrides})


def test_nn_rnn_train_and_eval_with_the_documented_scan_arguments():
    x = make_inputs()
    # No dropout here: the dropout rng streams depend on the module path, which differs below.
    train_rnn = nn.RNN(larnn_cell(deterministic=False), **TRAIN_SCAN)
    variables = train_rnn.init(jax.random.key(1), x)
    y, updates = train_rnn.apply(
        variables, x, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"]
    )
    assert y.shape == (B, T, H)
    before = variables["batch_stats"]["cell"]["update"]["gate_norm"]["mean"]
    after = updates["batch_stats"]["cell"]["update"]["gate_norm"]["mean"]
    assert not np.allclose(before, after)

    eval_rnn = nn.RNN(larnn_cell(deterministic=True), **EVAL_SCAN)
    y_eval = eval_rnn.apply({**variables, **updates}, x)
    # The ready layer's plain scan gives exactly what the hand-made scan gives, in both modes.
    layer = LARNNLayer(larnn_cell(), scan="plain")
    nest = lambda tree: jax.tree.map(lambda v: v, {k: {"rnn": v} for k, v in tree.items()})  # noqa: E731
    np.testing.assert_array_equal(layer.apply(nest({**variables, **updates}), x), y_eval)
    y_layer, _ = layer.apply(
        nest(variables),
        x,
        deterministic=False,
        rngs={"dropout": jax.random.key(2)},
        mutable=["batch_stats"],
    )
    np.testing.assert_array_equal(y_layer, y)


def test_dropout_differs_between_steps_and_vanishes_in_eval():
    x = jnp.broadcast_to(make_inputs((B, 1, D)), (B, T, D))
    layer = LARNNLayer(larnn_cell(dropout_rate=0.5))
    variables = layer.init(jax.random.key(1), x)

    def run(seed):
        y, _ = layer.apply(
            variables,
            x,
            deterministic=False,
            rngs={"dropout": jax.random.key(seed)},
            mutable=["batch_stats"],
        )
        return np.asarray(y)

    y = run(0)
    zeros_per_step = (y == 0).sum(axis=(0, 2))
    assert zeros_per_step.min() > 0  # dropout is applied at every step ...
    masks = y == 0
    assert not all(np.array_equal(masks[:, 0], masks[:, t]) for t in range(1, T))  # ... freshly
    np.testing.assert_array_equal(run(0), y)  # the same rng gives the same result
    assert not np.array_equal(run(1), y)
    assert not (np.asarray(layer.apply(variables, x)) == 0).any()


def test_bare_nn_rnn_with_batch_norm_explains_the_trap():
    with pytest.raises(ValueError, match="variable_carry='batch_stats'"):
        nn.RNN(larnn_cell(deterministic=False)).init(jax.random.key(0), make_inputs())


def test_layer_in_training_mode_requires_mutable_batch_stats():
    layer = LARNNLayer(larnn_cell())
    x = make_inputs()
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
        layer.apply(variables, x, deterministic=False)


def test_layer_and_none_norms_need_no_statistics_and_run_at_batch_size_one():
    x = make_inputs((1, T, D))
    for norm in ("layer", "none"):
        rnn = nn.RNN(
            larnn_cell(norm=norm, deterministic=False, **DROPOUTS),
            split_rngs=TRAIN_SCAN["split_rngs"],
        )
        variables = rnn.init(jax.random.key(0), x)
        assert "batch_stats" not in variables
        y = rnn.apply(variables, x, rngs={"dropout": jax.random.key(1)})
        assert y.shape == (1, T, H) and np.isfinite(y).all()


def test_bidirectional():
    x = make_inputs()
    bi = nn.Bidirectional(LARNNLayer(larnn_cell()), LARNNLayer(larnn_cell(), keep_order=True))
    variables = bi.init(jax.random.key(0), x)
    y = bi.apply(variables, x)
    assert y.shape == (B, T, 2 * H)
    # The backward half at step 0 has read the whole sequence: changing the last input moves it.
    y2 = bi.apply(variables, x.at[:, -1].add(1.0))
    np.testing.assert_array_equal(y2[:, 0, :H], y[:, 0, :H])
    assert not np.allclose(y2[:, 0, H:], y[:, 0, H:])


def test_seq_lengths_give_each_sequence_its_own_final_carry():
    x = make_inputs()
    lengths = jnp.array([T, 4, 1])
    layer = LARNNLayer(larnn_cell())
    variables = layer.init(jax.random.key(0), x)
    carry, y = layer.apply(variables, x, seq_lengths=lengths, return_carry=True)
    for b, length in enumerate(lengths.tolist()):
        # Eval mode: one sample alone, cut at its length, ends in the same carry.
        alone_carry, alone_y = layer.apply(variables, x[b : b + 1, :length], return_carry=True)
        np.testing.assert_allclose(y[b, :length], alone_y[0], rtol=1e-5, atol=1e-6)
        for got, want in zip(jax.tree.leaves(carry), jax.tree.leaves(alone_carry), strict=True):
            np.testing.assert_allclose(got[b], want[0], rtol=1e-5, atol=1e-6)
    assert carry.window.count.tolist() == [K - 1, K - 1, 1]  # entries older than c_{t-1}


def test_jit_grad_and_vmap():
    x = make_inputs()
    layer = LARNNLayer(larnn_cell(**DROPOUTS))
    variables = layer.init(jax.random.key(0), x)

    def loss(params, x):
        y, _ = layer.apply(
            {**variables, "params": params},
            x,
            deterministic=False,
            rngs={"dropout": jax.random.key(3)},
            mutable=["batch_stats"],
        )
        return jnp.mean(y**2)

    value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"], x)
    assert np.isclose(value, loss(variables["params"], x), rtol=1e-5)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))

    # vmap over independent groups of sequences equals applying to each group.
    groups = jnp.stack([x, x[::-1] * 0.5])
    batched = jax.vmap(lambda xs: layer.apply(variables, xs))(groups)
    for g in range(2):
        np.testing.assert_allclose(
            batched[g], layer.apply(variables, groups[g]), rtol=1e-5, atol=1e-6
        )


def test_bfloat16_compute_follows_float32():
    x = make_inputs()
    layer32 = LARNNLayer(larnn_cell())
    layer16 = LARNNLayer(larnn_cell(dtype=jnp.bfloat16))
    variables = layer32.init(jax.random.key(0), x)
    y32 = layer32.apply(variables, x)
    carry16, y16 = layer16.apply(variables, x, return_carry=True)
    assert y16.dtype == jnp.bfloat16 and carry16.window.key_entries.dtype == jnp.bfloat16
    assert jax.tree.map(lambda a: a.dtype, variables["params"]) == jax.tree.map(
        lambda a: jnp.dtype("float32"), variables["params"]
    )
    error = np.abs(np.asarray(y16, np.float32) - np.asarray(y32)).max()
    assert error < 0.1 * np.abs(np.asarray(y32)).max()


def test_carry_layout_and_initialize_carry_outside_init():
    cell = larnn_cell()
    carry = cell.initialize_carry(jax.random.key(0), (B, D))  # unbound, like Flax's own cells
    assert isinstance(carry, LARNNCarry)
    assert carry.h.shape == carry.c.shape == (B, H)
    window = carry.window
    assert window.key_entries.shape == window.value_entries.shape == (B, K - 1, H)
    assert window.count.shape == (B,) and window.count.dtype == jnp.int32
    assert window.moment_sums.shape == (B, 4, H)  # the window's statistics slide (no PE)
    with_pe = larnn_cell(use_positional_encoding=True)
    with_pe_carry = with_pe.initialize_carry(jax.random.key(0), (B, D))
    assert with_pe_carry.window.moment_sums.shape == (B, 0, H)
    c, h = BNLSTMCell(H).initialize_carry(jax.random.key(0), (B, D))
    assert c.shape == h.shape == (B, H)


def test_stepping_the_cell_by_hand_equals_the_scan():
    x = make_inputs()
    cell = larnn_cell()
    layer = LARNNLayer(cell)
    variables = layer.init(jax.random.key(0), x)
    cell_variables = jax.tree.map(lambda v: v, {k: v["rnn"]["cell"] for k, v in variables.items()})
    carry = cell.initialize_carry(jax.random.key(0), (B, D))
    outputs = []
    step = jax.jit(lambda carry, x_t: cell.apply(cell_variables, carry, x_t))
    for t in range(T):
        carry, h = step(carry, x[:, t])
        outputs.append(h)
    np.testing.assert_allclose(
        jnp.stack(outputs, 1), layer.apply(variables, x), rtol=1e-5, atol=1e-6
    )


def test_stack_has_its_own_parameters_and_carry_per_layer():
    x = make_inputs((B, T, H))
    stack = LARNN(larnn_cell(), num_layers=3)
    variables = stack.init(jax.random.key(0), x)
    kernels = [
        variables["params"][f"layer_{i}"]["rnn"]["cell"]["query"]["kernel"] for i in range(3)
    ]
    assert not np.allclose(kernels[0], kernels[1]) and not np.allclose(kernels[1], kernels[2])
    carries, y = stack.apply(variables, x, return_carries=True)
    assert len(carries) == 3 and y.shape == (B, T, H)
    assert not np.allclose(carries[0].c, carries[2].c)
    # Residual stacking: the output is the sum of the last layer's input and its own output.
    plain = LARNN(larnn_cell(), num_layers=3, residual_stacking=False).apply(variables, x)
    assert not np.allclose(plain, y)
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        LARNN(larnn_cell(), num_layers=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(features=10, num_heads=3), r"features \(10\) must be a multiple of num_heads \(3"),
        (dict(num_heads=0), "must be >= 1"),
        (dict(window_size=0), "window_size must be >= 1, got 0"),
        (dict(mode="dense"), "mode must be one of .* got 'dense'"),
        (dict(norm="group"), "norm must be one of .* got 'group'"),
        (dict(dropout_rate=1.0), r"dropout_rate must be in \[0, 1\), got 1.0"),
    ],
)
def test_construction_errors_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        larnn_cell(**overrides)


def test_wrong_input_rank_or_size_is_named():
    layer = LARNNLayer(larnn_cell())
    variables = layer.init(jax.random.key(0), make_inputs())
    with pytest.raises(ValueError, match=r"rank 3.*got shape \(3, 9\)"):
        layer.apply(variables, jnp.ones((B, T)))
    with pytest.raises(ValueError, match=r"input has 7 features .* initialised for 5"):
        layer.apply(variables, jnp.ones((B, T, 7)))
    cell = larnn_cell()
    carry = cell.initialize_carry(jax.random.key(0), (B, D))
    with pytest.raises(ValueError, match="does not match the carry's batch shape"):
        cell.init(jax.random.key(0), carry, jnp.ones((B + 1, D)))


@pytest.mark.slow
def test_checkpointed_training_scan_gives_the_same_result_and_gradients():
    with jax.enable_x64(True):  # exact comparison: float32 rounding is amplified by batch norm
        x = make_inputs().astype(jnp.float64)[:, :8]
        cell = larnn_cell(param_dtype=jnp.float64)
        plain = LARNNLayer(cell, scan="plain")
        chunked = LARNNLayer(cell, scan="remat", remat_chunk_length=4)
        variables = plain.init(jax.random.key(1), x)

        def loss(layer, params):
            (carry, y), updates = layer.apply(
                {**variables, "params": params},
                x,
                deterministic=False,
                return_carry=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(y**2) + jnp.sum(carry.c**2), updates

        results = [
            jax.value_and_grad(lambda p, layer=layer: loss(layer, p), has_aux=True)(
                variables["params"]
            )
            for layer in (plain, chunked)
        ]
        (value, updates), grads = results[0]
        (value_chunked, updates_chunked), grads_chunked = results[1]
        np.testing.assert_allclose(value_chunked, value, rtol=1e-12)
        for want, got in zip(
            jax.tree.leaves((grads, updates)),
            jax.tree.leaves((grads_chunked, updates_chunked)),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)
        with pytest.raises(
            ValueError, match="remat_chunk_length=5 must divide the sequence length 8"
        ):
            LARNNLayer(cell, scan="remat", remat_chunk_length=5).apply(
                variables, x, deterministic=False, mutable=["batch_stats"]
            )


def test_checkpointed_scan_applies_to_cells_without_a_deterministic_switch():
    """``nn.LSTMCell`` has no ``deterministic``: the call's argument selects training mode."""
    x = make_inputs()[:, :8]
    cell = nn.LSTMCell(6)
    plain = LARNNLayer(cell)
    chunked = LARNNLayer(cell, scan="remat", remat_chunk_length=4)
    variables = plain.init(jax.random.key(1), x)

    def loss(layer, params):
        return jnp.sum(layer.apply({"params": params}, x, deterministic=False) ** 2)

    value, grads = jax.value_and_grad(lambda p: loss(plain, p))(variables["params"])
    value_chunked, grads_chunked = jax.value_and_grad(lambda p: loss(chunked, p))(
        variables["params"]
    )
    np.testing.assert_allclose(value_chunked, value, rtol=1e-6)
    for want, got in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_chunked), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    rematerialised = LARNNLayer(cell, scan="remat", remat_chunk_length=5)
    with pytest.raises(ValueError, match="remat_chunk_length=5 must divide"):
        rematerialised.apply(variables, x, deterministic=False)
    # Evaluation mode scans plainly, whatever the chunk length.
    evaluated = rematerialised.apply(variables, x, deterministic=True)
    np.testing.assert_array_equal(evaluated, plain.apply(variables, x))


def test_window_moment_sums_match_the_window_after_a_long_sequence():
    """``moment_sums`` are updated by adding the entering and subtracting the leaving entry;
    after 2000 float32 training steps they must still be the sums over the window's entries."""
    steps, batch = 2000, 8
    x = make_inputs((batch, steps, D))
    layer = LARNNLayer(larnn_cell(**DROPOUTS), return_carry=True)
    variables = layer.init(jax.random.key(0), x[:, :2])
    (carry, _), _ = layer.apply(
        variables,
        x,
        deterministic=False,
        rngs={"dropout": jax.random.key(1)},
        mutable=["batch_stats"],
    )
    params = variables["params"]["rnn"]["cell"]
    order = head_minor_order(H, HEADS)  # the window's features are head-minor
    shift = np.stack([jax.nn.elu(params[name]["bias"])[order] for name in ("key", "value")])
    window = carry.window
    entries = np.stack([window.key_entries, window.value_entries], axis=-2).astype(np.float64)
    deviation = entries - shift  # (B, k-1, 2, H)
    assert window.count.tolist() == [K - 1] * batch
    expected = np.concatenate([deviation.sum(1), np.square(deviation).sum(1)], axis=-2)
    np.testing.assert_allclose(
        window.moment_sums, expected, rtol=0, atol=1e-5 * np.abs(expected).max()
    )
