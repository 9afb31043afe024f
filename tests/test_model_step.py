"""The classifier stepped one time step at a time equals the classifier on whole sequences."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larnn_jax import BNLSTMCell, LARNNCell
from larnn_jax.models import SequenceClassifier

B, T, D, CLASSES, H, LAYERS = 3, 9, 4, 5, 6, 3

CELLS = {
    "larnn": LARNNCell(H, num_heads=2, window_size=4),
    "larnn-layer-pe": LARNNCell(
        H, num_heads=3, window_size=3, mode="layer", use_positional_encoding=True
    ),
    "larnn-layernorm": LARNNCell(H, num_heads=2, window_size=4, norm="layer"),
    "bnlstm": BNLSTMCell(H),
    "lstm": nn.LSTMCell(H),
}


def with_random_statistics(variables: dict, seed: int) -> dict:
    """``variables`` with running means drawn from N(0, 0.3²) and variances from U(0.5, 2),
    so that evaluation mode uses statistics other than the initial 0 and 1."""
    if "batch_stats" not in variables:
        return variables
    leaves, tree = jax.tree.flatten_with_path(variables["batch_stats"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    drawn = [
        jax.random.uniform(key, leaf.shape, minval=0.5, maxval=2.0)
        if path[-1].key == "var"
        else 0.3 * jax.random.normal(key, leaf.shape)
        for key, (path, leaf) in zip(keys, leaves, strict=True)
    ]
    return {**variables, "batch_stats": jax.tree.unflatten(tree, drawn)}


@pytest.mark.parametrize(
    "name, residual_stacking",
    [(name, True) for name in CELLS] + [("larnn", False)],
    ids=[*CELLS, "larnn-plain-stacking"],
)
def test_stepping_equals_the_whole_sequence_at_every_step(name: str, residual_stacking: bool):
    model = SequenceClassifier(
        CLASSES, CELLS[name], num_layers=LAYERS, residual_stacking=residual_stacking
    )
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    variables = with_random_statistics(model.init(jax.random.key(1), x, deterministic=True), 2)

    step = jax.jit(lambda carries, x_t: model.apply(variables, carries, x_t, method="step"))
    carries = model.initialize_carries((B,))
    assert len(carries) == LAYERS
    stepped = []
    for t in range(T):
        carries, logits = step(carries, x[:, t])
        stepped.append(logits)
    stepped = np.stack(stepped, axis=1)  # (B, T, C): the logits of every prefix

    # Every prefix x[:, :t+1] at once: the batch repeated T times, with lengths 1 .. T.
    lengths = jnp.repeat(jnp.arange(1, T + 1), B)
    whole = jax.jit(
        lambda x, lengths: model.apply(variables, x, deterministic=True, seq_lengths=lengths)
    )
    prefixes = whole(jnp.tile(x, (T, 1, 1)), lengths).reshape(T, B, CLASSES).swapaxes(0, 1)
    np.testing.assert_allclose(stepped, prefixes, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stepped[:, -1], whole(x, None), rtol=1e-5, atol=1e-5)


def test_carries_of_any_batch_shape_and_from_apply():
    model = SequenceClassifier(CLASSES, CELLS["larnn"], num_layers=2)
    x = jax.random.normal(jax.random.key(0), (2, 3, T, D))  # two batch axes
    variables = model.init(jax.random.key(1), x[0], deterministic=True)
    carries = model.apply(variables, (2, 3), method="initialize_carries")
    assert jax.tree.map(jnp.shape, carries) == jax.tree.map(
        jnp.shape, model.initialize_carries((2, 3))
    )
    step = jax.jit(lambda carries, x_t: model.apply(variables, carries, x_t, method="step"))
    for t in range(T):
        carries, logits = step(carries, x[:, :, t])
    assert logits.shape == (2, 3, CLASSES)
    for row in range(2):
        whole = model.apply(variables, x[row], deterministic=True)
        np.testing.assert_allclose(logits[row], whole, rtol=1e-5, atol=1e-5)


def test_step_checks_the_number_of_carries():
    model = SequenceClassifier(CLASSES, CELLS["lstm"], num_layers=2)
    variables = model.init(jax.random.key(1), jnp.ones((1, T, D)), deterministic=True)
    carries = model.initialize_carries((1,))[:1]
    with pytest.raises(ValueError) as raised:
        model.apply(variables, carries, jnp.ones((1, D)), method="step")
    assert str(raised.value).splitlines()[0] == "1 carries given for 2 layers"
