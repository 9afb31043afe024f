"""The sequence classifier: every parameter learns, statistics move only in training."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from larnn_jax import BNLSTMCell, LARNNCell
from larnn_jax.models import SequenceClassifier
from larnn_jax.normalization import FeatureNorm

B, T, D, CLASSES = 8, 12, 4, 3
H, LAYERS = 6, 2
DROPOUTS = dict(dropout_rate=0.1, kv_dropout_rate=0.1, attention_dropout_rate=0.1)


def classifier(block: str = "larnn", **options) -> SequenceClassifier:
    """A small classifier with the cell ``block`` (``larnn``, ``bnlstm`` or ``lstm``)."""
    if block == "lstm":
        cell = nn.LSTMCell(H)
    elif block == "bnlstm":
        cell = BNLSTMCell(H, dropout_rate=options.get("dropout_rate", 0.0))
    else:
        cell = LARNNCell(H, num_heads=2, window_size=3, **options)
    return SequenceClassifier(CLASSES, cell, num_layers=LAYERS)


def batch(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(jax.random.key(seed), (B, T, D))
    return x, jnp.arange(B) % CLASSES


def train_step_gradients(model: SequenceClassifier):
    x, y = batch()
    variables = model.init(jax.random.key(1), x, deterministic=True)

    def loss(params):
        logits, updates = model.apply(
            {**variables, "params": params},
            x,
            deterministic=False,
            rngs={"dropout": jax.random.key(2)},
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    (_, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return variables, grads, updates


@pytest.mark.parametrize(
    "config",
    [
        dict(mode="residual"),
        dict(mode="layer", use_positional_encoding=True),
        dict(activation_on_keys_and_values=False, use_positional_encoding=True),
        dict(block="bnlstm"),
        dict(block="lstm"),
    ],
    ids=["larnn-residual", "larnn-layer-pe", "larnn-no-kv-activation", "bnlstm", "lstm"],
)
def test_every_parameter_gets_a_gradient(config):
    variables, grads, _ = train_step_gradients(classifier(**DROPOUTS, **config))
    flat = traverse_util.flatten_dict(grads, sep="/")
    assert set(flat) == set(traverse_util.flatten_dict(variables["params"], sep="/"))
    dead = [name for name, g in flat.items() if not np.any(np.asarray(g) != 0)]
    assert dead == []
    # Not just some entries: almost every single number moves.
    zeros = sum(int(np.sum(np.asarray(g) == 0)) for g in flat.values())
    total = sum(g.size for g in flat.values())
    assert zeros / total < 0.02
    if config.get("block", "larnn") == "larnn":
        layers = {name.split("/")[1] for name in flat if name.startswith("recurrent/")}
        assert layers == {"layer_0", "layer_1"}  # the stacked cells are registered and trained


def test_running_statistics_move_in_training_and_stay_in_evaluation():
    model = classifier(**DROPOUTS)
    variables, _, updates = train_step_gradients(model)
    before = traverse_util.flatten_dict(variables["batch_stats"], sep="/")
    after = traverse_util.flatten_dict(updates["batch_stats"], sep="/")
    assert set(before) == set(after) and len(before) == 2 * 6 * LAYERS  # mean, var of 6 norms
    unchanged = [name for name in before if np.allclose(before[name], after[name])]
    assert unchanged == []

    x, _ = batch()
    _, eval_updates = model.apply(variables, x, deterministic=True, mutable=["batch_stats"])
    for name, value in traverse_util.flatten_dict(eval_updates["batch_stats"], sep="/").items():
        np.testing.assert_array_equal(value, before[name])


@pytest.mark.parametrize("scan", ["fused", pytest.param("plain", marks=pytest.mark.slow)])
def test_bfloat16_training_step_keeps_statistics_and_softmax_in_float32(
    monkeypatch: pytest.MonkeyPatch, scan: str
) -> None:
    """With ``dtype=bfloat16``, a training step computes every batch-norm statistic and every
    attention softmax in float32, and keeps the running averages in float32: checked on the arrays
    the step computes (softmax inputs and the norms' scale and shift, intercepted while it is
    traced), not by reading the code."""
    softmax = jax.nn.softmax
    softmax_inputs: list[tuple[tuple[int, ...], jnp.dtype]] = []

    def recording_softmax(x: jax.Array, *args: object, **kwargs: object) -> jax.Array:
        softmax_inputs.append((x.shape, x.dtype))
        return softmax(x, *args, **kwargs)

    norm_results: dict[str, set[jnp.dtype]] = {}

    def record_norm_statistics(next_fun, args, kwargs, context):
        result = next_fun(*args, **kwargs)
        if isinstance(context.module, FeatureNorm) and context.method_name == "scale_and_shift":
            norm_results.setdefault(context.module.name, set()).update(a.dtype for a in result)
        return result

    monkeypatch.setattr(jax.nn, "softmax", recording_softmax)
    cell = LARNNCell(H, num_heads=2, window_size=3, dtype=jnp.bfloat16, **DROPOUTS)
    model = SequenceClassifier(CLASSES, cell, num_layers=1, scan=scan)
    with nn.intercept_methods(record_norm_statistics):
        variables, _, updates = train_step_gradients(model)

    window_scores = (B, cell.window_size, cell.num_heads)
    assert softmax_inputs and {shape for shape, _ in softmax_inputs} == {window_scores}
    assert {dtype for _, dtype in softmax_inputs} == {jnp.dtype("float32")}
    names = {"key_norm", "value_norm", "attention_norm", "gate_norm", "cell_norm", "hidden_norm"}
    assert norm_results == {name: {jnp.dtype("float32")} for name in names}
    before = traverse_util.flatten_dict(variables["batch_stats"], sep="/")
    after = traverse_util.flatten_dict(updates["batch_stats"], sep="/")
    assert set(after) == set(before)
    for name, value in after.items():
        assert value.dtype == before[name].dtype == jnp.float32, name
        assert not np.array_equal(value, before[name]), name


@pytest.mark.slow
def test_evaluation_ignores_the_rest_of_the_batch_and_training_does_not():
    model = classifier()
    x, _ = batch()
    variables = model.init(jax.random.key(1), x, deterministic=True)
    _, trained = train_step_gradients(model)[::2]
    variables = {**variables, **trained}
    other = x.at[1:].set(batch(seed=5)[0][1:])
    evaluate = jax.jit(lambda x: model.apply(variables, x, deterministic=True))
    np.testing.assert_allclose(evaluate(x)[0], evaluate(other)[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(evaluate(x[:1])[0], evaluate(x)[0], rtol=1e-5, atol=1e-6)

    def train_logits(x):
        return model.apply(variables, x, deterministic=False, mutable=["batch_stats"])[0]

    assert not np.allclose(train_logits(x)[0], train_logits(other)[0])  # batch statistics


def test_seq_lengths_select_each_sequence_last_step():
    model = classifier()
    x, _ = batch()
    variables = model.init(jax.random.key(1), x, deterministic=True)
    lengths = jnp.array([T, 5, 1, T, 7, 2, T, 3])
    logits = model.apply(variables, x, deterministic=True, seq_lengths=lengths)
    for b in (1, 2, 5):
        alone = model.apply(variables, x[b : b + 1, : int(lengths[b])], deterministic=True)
        np.testing.assert_allclose(logits[b], alone[0], rtol=1e-5, atol=1e-6)


def test_classifier_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"num_classes must be >= 1, got 0"):
        SequenceClassifier(0, LARNNCell(H, num_heads=2, window_size=3))
    with pytest.raises(ValueError, match=r"scan must be one of .* got 'sideways'"):
        SequenceClassifier(CLASSES, LARNNCell(H, num_heads=2, window_size=3), scan="sideways")
    model = classifier()
    with pytest.raises(ValueError, match=r"expected inputs \(batch, time, features\)"):
        model.init(jax.random.key(0), jnp.ones((B, D)), deterministic=True)
