"""The classifier and the layer in Flax NNX through ``nnx.bridge.ToNNX`` (``docs/nnx.md``).

The bridge carries the batch statistics through the layers' scans: a training call updates
them exactly as Linen's ``apply(..., mutable=['batch_stats'])`` with the same dropout key does,
an evaluation call leaves them alone and gives Linen's logits with the same variables, and a few
``nnx.Optimizer`` steps on a toy task lower the loss.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from larnn_jax import BNLSTMCell, LARNNCell, LARNNLayer
from larnn_jax.models import SequenceClassifier

LARNN_CELL = LARNNCell(8, num_heads=2, window_size=4, dropout_rate=0.2, attention_dropout_rate=0.1)
MODULES = {
    "larnn": SequenceClassifier(2, LARNN_CELL, num_layers=2),
    "bnlstm": SequenceClassifier(2, BNLSTMCell(8, dropout_rate=0.2), num_layers=2),
    "layer": LARNNLayer(LARNN_CELL),
}


def toy_task(rows: int = 32, steps: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Two classes told apart by the mean of channel 0."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, rows)
    x = rng.normal(size=(rows, steps, 3)).astype(np.float32)
    x[:, :, 0] += 2.0 * y[:, None] - 1.0
    return x, y


def bridged(linen: nn.Module) -> nnx.bridge.ToNNX:
    x, _ = toy_task()
    model = nnx.bridge.ToNNX(linen, rngs=nnx.Rngs(params=0, dropout=1))
    return model.lazy_init(x[:2], deterministic=True)


def linen_variables(model: nnx.bridge.ToNNX) -> dict:
    """The Linen variables of the bridged model, as ``SequenceClassifier.apply`` takes them."""
    return {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    }


def assert_trees_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def assert_trees_close(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODULES)
def test_training_and_evaluation_calls_are_linens(name: str) -> None:
    model = bridged(MODULES[name])
    linen = model.to_nnx__module
    x, _ = toy_task()
    before = linen_variables(model)
    assert before["batch_stats"], "the statistics are NNX BatchStat variables"

    # Evaluation: Linen's logits, the statistics untouched.
    np.testing.assert_array_equal(
        model(x, deterministic=True), linen.apply(before, x, deterministic=True)
    )
    assert_trees_equal(linen_variables(model), before)

    # Training: the dropout key the bridge draws next, then Linen's call with that key.
    key = nnx.clone(model.to_nnx__rngs).dropout()
    logits = model(x, deterministic=False, mutable=["batch_stats"])
    expected, updates = linen.apply(
        before, x, deterministic=False, rngs={"dropout": key}, mutable=["batch_stats"]
    )
    # The same masks (dropout 0.2 would change the logits by far more); the compiled step of
    # an eager call rounds apart from another's by a few float32 ulps.
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    after = linen_variables(model)
    assert_trees_close(after["batch_stats"], updates["batch_stats"])
    assert_trees_equal(after["params"], before["params"])
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), after["batch_stats"], before["batch_stats"]
    )
    assert all(jax.tree.leaves(changed)), "every running statistic moves in training"

    # A fresh dropout key at every training call: other masks, other logits.
    again = model(x, deterministic=False, mutable=["batch_stats"])
    assert not np.array_equal(again, logits)


def test_a_few_optimizer_steps_lower_the_loss() -> None:
    model = bridged(MODULES["larnn"])
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x, y = toy_task()

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x, deterministic=False, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    stats = linen_variables(model)["batch_stats"]
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses
    trained = linen_variables(model)
    assert not np.array_equal(
        trained["batch_stats"]["recurrent"]["layer_0"]["rnn"]["cell"]["update"]["gate_norm"][
            "mean"
        ],
        stats["recurrent"]["layer_0"]["rnn"]["cell"]["update"]["gate_norm"]["mean"],
    )
    evaluation = model(x, deterministic=True)
    assert_trees_equal(linen_variables(model), trained)
    np.testing.assert_array_equal(
        evaluation, model.to_nnx__module.apply(trained, x, deterministic=True)
    )
