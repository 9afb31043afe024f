"""The classifier and the layer in Flax NNX through ``nnx.bridge.ToNNX`` (``docs/nnx.md``).

The bridge carries the batch statistics through the layers' scans: a training call updates
them exactly as Linen's ``apply(..., mutable=['batch_stats'])`` with the same dropout key does,
an evaluation call leaves them alone and gives Linen's logits with the same variables. The
training with ``nnx.Optimizer`` is ``docs/nnx.md``'s example, which ``tests/test_docs.py`` runs:
its loss falls, the running statistics move in training and not in evaluation.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from larnn_jax import BNLSTMCell, LARNNCell, LARNNLayer
from larnn_jax.models import SequenceClassifier

LARNN_CELL = LARNNCell(8, num_heads=2, window_size=4, dropout_rate=0.2, attention_dropout_rate=0.1)
#: The XLA scan for the LARNN cells: the native step's training batch statistics are summed by a
#: team of threads whose size follows the machine's load, so that two calls may round apart.
MODULES = {
    "larnn": SequenceClassifier(2, LARNN_CELL, num_layers=1, scan="fused"),
    "bnlstm": SequenceClassifier(2, BNLSTMCell(8, dropout_rate=0.2), num_layers=1),
    "layer": LARNNLayer(LARNN_CELL, scan="fused"),
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

    # Training, both jitted: the dropout key the bridge draws next, then Linen's call with it.
    @nnx.jit
    def train_call(model: nnx.bridge.ToNNX, x: jax.Array) -> jax.Array:
        return model(x, deterministic=False, mutable=["batch_stats"])

    def linen_train_call(variables: dict, x: jax.Array, key: jax.Array) -> tuple:
        return linen.apply(
            variables, x, deterministic=False, rngs={"dropout": key}, mutable=["batch_stats"]
        )

    key = nnx.clone(model.to_nnx__rngs).dropout()
    logits = train_call(model, x)
    expected, updates = jax.jit(linen_train_call)(before, x, key)
    np.testing.assert_array_equal(logits, expected)
    after = linen_variables(model)
    assert_trees_equal(after["batch_stats"], updates["batch_stats"])
    assert_trees_equal(after["params"], before["params"])
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), after["batch_stats"], before["batch_stats"]
    )
    assert all(jax.tree.leaves(changed)), "every running statistic moves in training"

    # A fresh dropout key at every training call: other masks, other logits.
    again = train_call(model, x)
    assert not np.array_equal(again, logits)
