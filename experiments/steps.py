"""The model, the optimiser and the jitted steps of a training run, built from its configuration.

* :func:`build_model`: the classifier of a :class:`~experiments.config.TrainConfig`;
* :func:`make_optimizer`: Adam with L2 in the gradient and a staircase learning rate;
* :func:`init_state` and :func:`make_train_step`: the training state and one training step
  (augmentation of the batch, forward, backward, update), which donates the state it is given;
* :func:`build_augmentation`: the augmentation of the training rows;
* :func:`make_evaluator`: evaluation of a whole split, counting the rows whose logits diverged.

The benchmarks (``benchmarks/harness/workloads.py``) time these same functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from experiments.augmentation import OPTIONS as AUGMENTATION_OPTIONS
from experiments.augmentation import Augmentation
from experiments.config import ConfigError, TrainConfig
from experiments.data import Dataset, Split
from larnn_jax.models import SequenceClassifier
from larnn_jax.typing import PyTree


def build_model(config: TrainConfig, num_classes: int) -> SequenceClassifier:
    """The classifier that ``config`` describes, for ``num_classes`` classes.

    Its cell is :meth:`TrainConfig.build_cell`; its layers scan as ``config.scan`` says
    (:mod:`larnn_jax.scans`), in chunks of ``config.remat_chunk_length`` for ``'remat'``.
    """
    return SequenceClassifier(
        num_classes,
        config.build_cell(),
        num_layers=config.num_layers,
        residual_stacking=config.residual_stacking,
        scan=config.scan,
        remat_chunk_length=config.remat_chunk_length,
    )


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Step → learning rate. ``schedule='step'``: ``learning_rate × decay_factor ** (epochs
    done // decay_every)``; ``'cosine'``: ``learning_rate × (1 + cos(π · step / total)) / 2``
    over the ``epochs × steps_per_epoch`` steps of the run."""
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(config.learning_rate, config.epochs * steps_per_epoch)
    return optax.exponential_decay(
        init_value=config.learning_rate,
        transition_steps=config.decay_every * steps_per_epoch,
        decay_rate=config.decay_factor,
        staircase=True,
    )


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam with L2 added to the gradient first (PyTorch ``Adam(weight_decay=l2)``), the
    learning rate of :func:`learning_rate_schedule`.

    Per step: ``g ← g + l2·θ``; Adam moments of that ``g`` (β = 0.9, 0.999, ε = 1e-8 outside the
    square root, bias-corrected); ``θ ← θ − lr(step) · m̂ / (√v̂ + ε)``.
    """
    return optax.chain(
        optax.add_decayed_weights(config.l2),
        optax.scale_by_adam(),
        optax.scale_by_learning_rate(learning_rate_schedule(config, steps_per_epoch)),
    )


def per_example_loss(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Softmax cross-entropy ``(B,)`` of logits ``(B, C)`` against integer labels ``(B,)``,
    smoothed to ``(1 − s)·onehot + s / C`` with ``label_smoothing`` ``s``."""
    if label_smoothing == 0:
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.losses.softmax_cross_entropy(logits, targets)


def init_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    sample: jax.Array,
    seed: int,
    *,
    average: bool = False,
) -> dict[str, PyTree]:
    """The training state before the first step.

    Args:
        model: the classifier: :func:`build_model`'s, or any module ``model(x, deterministic=...)``
            that maps ``(B, T, C)`` to logits ``(B, classes)`` (the benchmarks').
        tx: the optimiser.
        sample: an input batch ``(B, T, C)`` (only its shape and dtype matter).
        seed: the run's seed.
        average: keep a moving average of the weights (``ema_decay``).

    Returns:
        ``{"params", "batch_stats" ({} for models without), "opt_state", "rng"}``, where ``rng``
        is the raw data (``uint32``) of the key from which every step's dropout key is derived;
        with ``average``, also ``"average": {"params", "batch_stats"}``: the averaged weights
        (starting at the initial ones) and their norm statistics.
    """
    params_key, init_dropout_key, rng = jax.random.split(jax.random.key(seed), 3)

    @jax.jit
    def init(x: jax.Array) -> dict[str, PyTree]:
        variables = model.init(
            {"params": params_key, "dropout": init_dropout_key}, x, deterministic=True
        )
        params = variables["params"]
        state = {
            "params": params,
            "batch_stats": variables.get("batch_stats", {}),
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(rng),
        }
        if average:
            # Copies: the training step donates the state, and no two leaves may share a buffer.
            state["average"] = jax.tree.map(
                jnp.copy, {"params": params, "batch_stats": state["batch_stats"]}
            )
        return state

    return init(sample)


#: Folded into the run's key to give the augmentation its own stream of keys (the dropout keys
#: are the run's key folded with the step alone, as before augmentation existed).
AUGMENTATION_STREAM = 0x6175_6700


def build_augmentation(config: TrainConfig, dataset: Dataset) -> Augmentation | None:
    """The augmentation of ``config``'s training rows (None when every option is off), with the
    standardisation of ``dataset``'s inputs.

    Raises:
        ConfigError: a rotation is asked of inputs whose channels are not (x, y, z) triplets;
            ``rotation_classes`` names a class the dataset does not have, or no rotation is on.
    """
    channels = dataset.train.x.shape[-1]
    options = {name: getattr(config, name) for name in AUGMENTATION_OPTIONS}
    names = [name.strip() for name in config.rotation_classes.split(",") if name.strip()]
    unknown = [name for name in names if name not in dataset.class_names]
    if unknown:
        raise ConfigError(
            f"rotation_classes: {dataset.name} has no class {', '.join(map(repr, unknown))}; "
            f"its classes: {', '.join(dataset.class_names)}"
        )
    try:
        augmentation = Augmentation(
            channel_mean=np.zeros(channels, np.float32)
            if dataset.channel_mean is None
            else dataset.channel_mean,
            channel_std=np.ones(channels, np.float32)
            if dataset.channel_std is None
            else dataset.channel_std,
            rotation_classes=tuple(dataset.class_names.index(name) for name in names),
            **options,
        )
    except ValueError as err:
        raise ConfigError(f"{dataset.name}: {err}") from err
    return augmentation if augmentation.active else None


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    augmentation: Augmentation | None = None,
    label_smoothing: float = 0.0,
    ema_decay: float = 0.0,
) -> Callable[..., tuple[dict[str, PyTree], jax.Array, jax.Array]]:
    """A jitted ``train_step(state, x_all, y_all, rows, step) -> (state, loss, accuracy)`` of
    ``model`` (as :func:`init_state`'s).

    ``x_all (N, T, C)`` and ``y_all (N,)`` are the training rows (on the device), ``rows (B,)``
    the indices of this batch, ``step`` the global step number (from 0): the dropout key is
    ``fold_in(state["rng"], step)``, the augmentation's (if any) ``fold_in(fold_in(state["rng"],
    AUGMENTATION_STREAM), step)``. ``loss`` (with ``label_smoothing``, see
    :func:`per_example_loss`) and ``accuracy`` are the batch means. With ``ema_decay`` ``d``
    (the state must hold ``"average"``, :func:`init_state`), the averaged weights follow the
    updated ones: ``average ← d · average + (1 − d) · params``.

    The step donates ``state``: its buffers hold the new state, and the ``state`` passed in
    must not be used again (use the one returned).
    """

    def loss_fn(
        params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, tuple[PyTree, jax.Array]]:
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            deterministic=False,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y)
        loss = per_example_loss(logits, y, label_smoothing).mean()
        return loss, (updates.get("batch_stats", {}), accuracy)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(
        state: dict[str, PyTree], x_all: jax.Array, y_all: jax.Array, rows: jax.Array, step: int
    ) -> tuple[dict[str, PyTree], jax.Array, jax.Array]:
        run_key = jax.random.wrap_key_data(state["rng"])
        key = jax.random.fold_in(run_key, step)
        x, y = x_all[rows], y_all[rows]
        if augmentation is not None:
            augmentation_key = jax.random.fold_in(run_key, AUGMENTATION_STREAM)
            x = augmentation(jax.random.fold_in(augmentation_key, step), x, y)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (batch_stats, accuracy)), grads = grad_fn(
            state["params"], state["batch_stats"], x, y, key
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {**state, "params": params, "batch_stats": batch_stats}
        if ema_decay:
            average = optax.incremental_update(params, state["average"]["params"], 1 - ema_decay)
            new_state["average"] = {**state["average"], "params": average}
        return {**new_state, "opt_state": opt_state}, loss, accuracy

    return train_step


#: A row whose largest |logit| exceeds this has diverged. A softmax is saturated long before
#: that; such rows come from an unstable evaluation-mode recurrence (hidden states growing
#: exponentially over time with batch norm's running averages), not from confident predictions.
DIVERGED_LOGIT = 1e3


def diverged_rows(logits: jax.Array) -> jax.Array:
    """Whether each row of ``logits`` ``(B, C)`` diverged ``(B,)``: a non-finite logit, or one
    beyond :data:`DIVERGED_LOGIT` in magnitude."""
    # NaN compares false, so a NaN row is not "all within bounds" either.
    return ~jnp.all(jnp.abs(logits) <= DIVERGED_LOGIT, axis=-1)


@dataclasses.dataclass(frozen=True)
class SplitResult:
    """Evaluation of one split.

    Attributes:
        loss: mean cross-entropy; None when it is not finite (rows that diverged to
            non-finite logits; the accuracy and predictions are still meaningful).
        accuracy: fraction of rows predicted correctly.
        predictions: the predicted class of every row ``(N,)``.
        diverged: number of rows whose logits diverged (see :func:`diverged_rows`).
        probabilities: the class probabilities of every row ``(N, K)`` float32, the softmax of
            its logits (NaN in a row whose logits are not finite).
    """

    loss: float | None
    accuracy: float
    predictions: np.ndarray
    diverged: int
    probabilities: np.ndarray


def make_evaluator(
    model: SequenceClassifier, batch_size: int
) -> Callable[[PyTree, Split], SplitResult]:
    """``evaluate(variables, split) -> SplitResult`` in evaluation mode, over all rows.

    Rows go through in batches of ``batch_size``; the last batch is padded with zeros and the
    padding masked out (evaluation mode does not mix rows, so padding changes nothing).
    """

    @jax.jit
    def eval_batch(
        variables: PyTree, x: jax.Array, y: jax.Array, mask: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Loss sum, predictions ``(B,)``, diverged-row count of the rows ``mask`` keeps and
        probabilities ``(B, K)``."""
        logits = cast(jax.Array, model.apply(variables, x, deterministic=True))
        return (
            jnp.sum(jnp.where(mask > 0, per_example_loss(logits, y), 0.0)),
            jnp.argmax(logits, axis=-1),
            jnp.sum(diverged_rows(logits) & (mask > 0)),
            jax.nn.softmax(logits.astype(jnp.float32), axis=-1),
        )

    def evaluate(variables: PyTree, split: Split) -> SplitResult:
        rows = len(split.y)
        padded = math.ceil(rows / batch_size) * batch_size
        x = np.zeros((padded, *split.x.shape[1:]), split.x.dtype)
        x[:rows] = split.x
        y = np.zeros(padded, np.int32)
        y[:rows] = split.y
        mask = (np.arange(padded) < rows).astype(np.float32)
        loss_sum, predictions, diverged, probabilities = 0.0, [], 0, []
        for start in range(0, padded, batch_size):
            batch = slice(start, start + batch_size)
            batch_loss, batch_predictions, batch_diverged, batch_probabilities = eval_batch(
                variables, x[batch], y[batch], mask[batch]
            )
            loss_sum += float(batch_loss)
            predictions.append(np.asarray(batch_predictions))
            diverged += int(batch_diverged)
            probabilities.append(np.asarray(batch_probabilities))
        predicted = np.concatenate(predictions)[:rows]
        accuracy = float(np.mean(predicted == split.y))
        loss = loss_sum / rows
        return SplitResult(
            loss if math.isfinite(loss) else None,
            accuracy,
            predicted,
            diverged,
            np.concatenate(probabilities)[:rows],
        )

    return evaluate


#: Training batches whose statistics the averaged weights' norms take (:func:`make_statistics_estimator`):
#: the running averages move by 1 % per time step, so after 4 batches of 128 steps the statistics
#: the raw weights left weigh 0.99^512 < 0.6 %.
STATISTICS_BATCHES = 4
#: Folded into the run's key for the dropout and augmentation keys of those batches.
STATISTICS_STREAM = 0x7374_6174


def make_statistics_estimator(
    model: SequenceClassifier, augmentation: Augmentation | None = None
) -> Callable[..., dict[str, PyTree]]:
    """``estimate(state, x_all, y_all, rows, epoch) -> state`` with the averaged weights' norm
    statistics re-estimated (``state["average"]["batch_stats"]``).

    The averaged weights run forward in training mode (dropout and ``augmentation`` as in
    training, keys from ``fold_in(state["rng"], STATISTICS_STREAM)``, the epoch and the batch)
    over the batches ``rows`` ``(K, B)`` of the training rows ``x_all`` ``(N, T, C)`` (labels
    ``y_all`` ``(N,)``, which the augmentation may use), starting
    from the raw weights' statistics; the running averages are updated at every time step, as in
    training. Weights averaged over many steps are not any one step's weights: the statistics the
    raw weights gathered do not fit them exactly.
    """

    @jax.jit
    def forward(
        params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array, key: jax.Array
    ) -> PyTree:
        if augmentation is not None:
            x = augmentation(jax.random.fold_in(key, 1), x, y)
        _, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            deterministic=False,
            rngs={"dropout": jax.random.fold_in(key, 0)},
            mutable=["batch_stats"],
        )
        return updates["batch_stats"]

    def estimate(
        state: dict[str, PyTree],
        x_all: jax.Array,
        y_all: jax.Array,
        rows: np.ndarray,
        epoch: int,
    ) -> dict[str, PyTree]:
        if not state["batch_stats"]:
            return state
        stream = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), STATISTICS_STREAM)
        batch_stats = state["batch_stats"]
        for index, batch in enumerate(rows):
            key = jax.random.fold_in(jax.random.fold_in(stream, epoch), index)
            batch_stats = forward(
                state["average"]["params"], batch_stats, x_all[batch], y_all[batch], key
            )
        return {**state, "average": {**state["average"], "batch_stats": batch_stats}}

    return estimate


def model_variables(state: dict[str, PyTree], *, raw: bool = False) -> PyTree:
    """The Flax variables (params and batch statistics) of a training state's model: the
    averaged weights where the state keeps them (``ema_decay``), unless ``raw``."""
    if "average" in state and not raw:
        return dict(state["average"])
    return {"params": state["params"], "batch_stats": state["batch_stats"]}
