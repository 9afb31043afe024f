"""Train a LARNN (or a baseline) sequence classifier on UCI HAR (default) or a .npz dataset.

    python -m experiments.train                         # the paper's best configuration
    python -m experiments.train --epochs 10 --out runs/try
    python -m experiments.train --out runs/try --resume  # continue after an interruption
    python -m experiments.train --config sweep.json --seed 3

Everything a run produces goes to its folder ``OUT``:

    config.json            the full configuration (TrainConfig fields)
    metrics.jsonl          one JSON line per epoch (also printed to stdout)
    checkpoints/           every epoch's state, see experiments/checkpoints.py
    report.json            final figures, see experiments/report.py
    learning_curves.png, confusion_matrix.png

:func:`train` is the whole run as a function, for sweeps that call it in-process.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import logging
import math
import numbers
import os
import pathlib
import sys
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from experiments import report
from experiments.checkpoints import CheckpointStore
from larnn_jax.cell import CELL_NORM_PLACEMENTS, MODES
from larnn_jax.data import DataError, Dataset, Split, load_dataset
from larnn_jax.models import BLOCKS, SequenceClassifier
from larnn_jax.normalization import NORM_KINDS

log = logging.getLogger("experiments.train")  # not __name__: that is "__main__" under -m

PyTree = Any
#: ``epoch_callback(metrics, checkpoint_dir)``: called after each epoch's checkpoint is on disk.
EpochCallback = Callable[[dict[str, Any], pathlib.Path], None]


class ConfigError(ValueError):
    """An invalid configuration, or one that contradicts the run being resumed."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped without saving the bad state.

    (A non-finite evaluation loss does not stop a run: see :func:`diverged_rows`.)

    Attributes:
        epoch: the epoch (1-based) in which it happened.
        step: the training step within that epoch (1-based).
        value: the offending loss value.
    """

    def __init__(self, message: str, *, epoch: int, step: int, value: float):
        super().__init__(message)
        self.epoch, self.step, self.value = epoch, step, value

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Copy and pickle with the keyword arguments (Ray copies a failed trial's error)."""
        rebuild = functools.partial(type(self), epoch=self.epoch, step=self.step, value=self.value)
        return rebuild, self.args


def _option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field carrying its command-line help (and ``choices``) in its metadata."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; defaults are the paper's best configuration (SPEC §4).

    Field names are the keys of ``--config`` files and of ``config.json``; the command-line flag
    of field ``some_name`` is ``--some-name`` (``--no-some-name`` for switches). Resuming a run
    requires the same values for all fields except :data:`RUN_FIELDS`.
    """

    model: str = _option(
        "larnn",
        "recurrent block: larnn (LSTM attending over its recent cell states), bnlstm (the same "
        "cell without attention) or lstm (plain LSTM, no normalisation or dropout)",
        choices=BLOCKS,
    )
    mode: str = _option(
        "residual",
        "how attention enters the gates (larnn): residual (separate weights for input, hidden "
        "state and attention) or layer (one dense layer over their concatenation)",
        choices=MODES,
    )
    hidden: int = _option(81, "hidden size H: units of every layer (a multiple of --heads)")
    heads: int = _option(27, "attention heads (larnn)")
    window: int = _option(
        38, "attention window: number of most recent cell states attended over, in time steps"
    )
    layers: int = _option(3, "number of stacked recurrent layers")
    residual_stacking: bool = _option(
        True, "add each layer's output to its input sequence instead of replacing it"
    )
    positional_encoding: bool = _option(
        False, "concatenate a positional encoding to each window entry (larnn)"
    )
    kv_activation: bool = _option(True, "apply BN∘elu to attention keys and values (larnn)")
    norm: str = _option(
        "batch",
        "normalisation inside the cells (larnn, bnlstm)",
        choices=NORM_KINDS,
    )
    cell_norm_placement: str = _option(
        "output",
        "where the cell state's norm BN_c sits (larnn, bnlstm): output (c_t carried "
        "unnormalised, h_t = BN_h(o * elu(BN_c(c_t))); stable) or carried (the paper's "
        "c_t = BN_c(f * c_{t-1} + i * g), carried; its evaluation diverges on some sequences)",
        choices=CELL_NORM_PLACEMENTS,
    )
    dropout: float = _option(0.0889, "dropout probability on each layer's output h_t")
    kv_dropout: float = _option(0.1, "dropout probability on window entries (larnn)")
    attention_dropout: float = _option(0.1, "dropout probability on attention weights (larnn)")
    learning_rate: float = _option(0.006026, "Adam's initial learning rate (per step)")
    l2: float = _option(
        0.00065,
        "L2 coefficient: l2 × weight is added to the gradient before Adam, like PyTorch Adam's "
        "weight_decay",
    )
    decay_every: int = _option(
        26, "multiply the learning rate by --decay-factor every this many epochs (staircase)"
    )
    decay_factor: float = _option(0.75, "learning-rate decay factor")
    epochs: int = _option(100, "number of epochs (passes over the training rows)")
    batch_size: int = _option(
        256,
        "rows per training step, the last incomplete batch of each epoch being dropped; also "
        "the evaluation batch size",
    )
    checkpoint_every: int | None = _option(
        None,
        "rematerialise the training scans in chunks of N time steps: about 10-20 percent more "
        "time for much less memory; N must divide the sequence length (default: off)",
    )
    seed: int = _option(
        0,
        "random seed of initialisation, validation split, shuffling (per epoch) and dropout "
        "(per step)",
    )
    dataset: str = _option(
        "uci_har",
        "uci_har, or npz:PATH for a .npz file with X_train (N,T,C), y_train (N,), X_test, "
        "y_test and optionally X_val, y_val, subjects_train",
        metavar="SPEC",
    )
    data_dir: str | None = _option(
        None,
        "folder that holds (or receives) 'UCI HAR Dataset/' (default: $LARNN_DATA_DIR, else "
        "the user cache folder)",
        metavar="DIR",
    )
    validation_subjects: int = _option(
        4, "whole training subjects held out for validation when subject ids are known; 0: none"
    )
    validation_fraction: float = _option(
        0.2,
        "fraction of training rows held out for validation when subject ids are unknown (npz "
        "without X_val); 0: none",
    )
    standardize: bool = _option(
        True, "standardise every channel with the training rows' mean and standard deviation"
    )
    out: str | None = _option(
        None,
        "run folder for config, metrics, checkpoints, report and figures (default: "
        "runs/<date>-<time>-<model>)",
        metavar="DIR",
    )
    progress: bool = _option(True, "show a progress bar per epoch (on a terminal only)")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = _checked_value(field.name, getattr(self, field.name), hints[field.name])
            object.__setattr__(self, field.name, value)  # e.g. numpy.int64 → int
            choices = field.metadata.get("choices")
            if choices is not None and getattr(self, field.name) not in choices:
                raise ConfigError(
                    f"{field.name} must be one of {', '.join(choices)}; got "
                    f"{getattr(self, field.name)!r}"
                )
        positive = ("hidden", "heads", "window", "layers", "decay_every", "epochs", "batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("dropout", "kv_dropout", "attention_dropout", "validation_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1); got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.l2 < 0 or not 0 < self.decay_factor <= 1:
            raise ConfigError(
                "need learning_rate > 0, l2 >= 0 and 0 < decay_factor <= 1; got "
                f"{self.learning_rate}, {self.l2}, {self.decay_factor}"
            )
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError(
                f"checkpoint_every must be >= 1 (or null: off); got {self.checkpoint_every}"
            )
        if self.validation_subjects < 0:
            raise ConfigError(f"validation_subjects must be >= 0; got {self.validation_subjects}")
        if self.model == "larnn" and self.hidden % self.heads:
            raise ConfigError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from a dict of field values (missing fields take their defaults).

        Raises:
            ConfigError: unknown keys, or invalid values.
        """
        _check_keys(values)
        return cls(**values)

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> TrainConfig:
        """The config of a saved run (``config.json``, a checkpoint's metadata): as
        :meth:`from_dict`, but a field the run predates takes the value the run used
        (:data:`SETTINGS_OF_OLDER_RUNS`), not today's default."""
        return cls.from_dict(with_settings_of_older_runs(values))

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-serialisable."""
        return dataclasses.asdict(self)


#: Fields that may differ when a run is resumed: they change where things go, how long the run is
#: or how much memory it takes, not what any completed epoch computes. (With dropout, changing
#: checkpoint_every changes which dropout masks later epochs draw, not their distribution.)
RUN_FIELDS = frozenset({"epochs", "checkpoint_every", "data_dir", "out", "progress"})


#: Fields added after runs had been saved without them, with the value those runs used.
SETTINGS_OF_OLDER_RUNS: dict[str, Any] = {"cell_norm_placement": "carried"}


def with_settings_of_older_runs(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved configuration with the fields it predates filled in as that run used them."""
    return {**SETTINGS_OF_OLDER_RUNS, **saved}


def _check_keys(values: dict[str, Any]) -> None:
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )


def _types(annotation: Any) -> tuple[Any, ...]:
    """The types a field annotation admits: ``str | None`` → ``(str, NoneType)``."""
    return tuple(typing.get_args(annotation)) or (annotation,)


def _checked_value(name: str, value: Any, annotation: Any) -> Any:
    """``value`` as the plain Python type of the field, or ConfigError if it is not one.

    Any integer (numpy's too, as sweeps produce) is accepted for int fields, any real number for
    float fields; a bool is accepted only where a bool is expected.
    """
    allowed = _types(annotation)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif int in allowed and isinstance(value, numbers.Integral):
        return int(value)
    elif float in allowed and isinstance(value, numbers.Real):
        return float(value)
    elif str in allowed and isinstance(value, str):
        return value
    expected = " or ".join("null" if a is type(None) else a.__name__ for a in allowed)
    raise ConfigError(f"{name} must be {expected}; got {value!r}")


def load_config_file(path: os.PathLike | str) -> dict[str, Any]:
    """Reads a JSON object of TrainConfig fields and checks its keys (not yet its values).

    Raises:
        ConfigError: the file is unreadable, not a JSON object, or has unknown keys.
    """
    try:
        values = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a JSON object of TrainConfig fields")
    try:
        _check_keys(values)
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}") from err
    return values


# ------------------------------------------------------------------------------------------------
# Model, optimiser, steps


def build_model(config: TrainConfig, num_classes: int) -> SequenceClassifier:
    """The classifier that ``config`` describes, for ``num_classes`` classes."""
    return SequenceClassifier(
        num_classes=num_classes,
        block=config.model,
        features=config.hidden,
        num_layers=config.layers,
        residual_stacking=config.residual_stacking,
        num_heads=config.heads,
        window_size=config.window,
        mode=config.mode,
        use_positional_encoding=config.positional_encoding,
        activation_on_keys_and_values=config.kv_activation,
        norm=config.norm,
        cell_norm_placement=config.cell_norm_placement,
        dropout_rate=config.dropout,
        kv_dropout_rate=config.kv_dropout,
        attention_dropout_rate=config.attention_dropout,
        checkpoint_every=config.checkpoint_every,
    )


def load_config_dataset(config: TrainConfig) -> Dataset:
    """The dataset ``config`` names, split and standardised as its settings say."""
    return load_dataset(
        config.dataset,
        config.data_dir,
        validation_subjects=config.validation_subjects,
        validation_fraction=config.validation_fraction,
        standardize=config.standardize,
        seed=config.seed,
    )


def check_checkpoint_every(checkpoint_every: int | None, dataset: Dataset) -> None:
    """Raises :class:`ConfigError` unless ``checkpoint_every`` is off or divides the dataset's
    sequence length ``T`` (the rematerialised scan runs in chunks of that many steps)."""
    steps = dataset.train.x.shape[1]
    if checkpoint_every is not None and steps % checkpoint_every:
        raise ConfigError(
            f"checkpoint_every {checkpoint_every} does not divide the sequence length "
            f"T = {steps} of {dataset.name}"
        )


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Step → learning rate: ``learning_rate × decay_factor ** (epochs done // decay_every)``."""
    return optax.exponential_decay(
        init_value=config.learning_rate,
        transition_steps=config.decay_every * steps_per_epoch,
        decay_rate=config.decay_factor,
        staircase=True,
    )


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam with L2 added to the gradient first (PyTorch ``Adam(weight_decay=l2)``), staircase lr.

    Per step: ``g ← g + l2·θ``; Adam moments of that ``g`` (β = 0.9, 0.999, ε = 1e-8 outside the
    square root, bias-corrected); ``θ ← θ − lr(step) · m̂ / (√v̂ + ε)``.
    """
    return optax.chain(
        optax.add_decayed_weights(config.l2),
        optax.scale_by_adam(),
        optax.scale_by_learning_rate(learning_rate_schedule(config, steps_per_epoch)),
    )


def per_example_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy ``(B,)`` of logits ``(B, C)`` against integer labels ``(B,)``."""
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)


def init_state(
    model: SequenceClassifier, tx: optax.GradientTransformation, sample: jax.Array, seed: int
) -> dict[str, PyTree]:
    """The training state before the first step.

    Args:
        model: the classifier.
        tx: the optimiser.
        sample: an input batch ``(B, T, C)`` (only its shape and dtype matter).
        seed: the run's seed.

    Returns:
        ``{"params", "batch_stats" ({} for models without), "opt_state", "rng"}``, where ``rng``
        is the raw data (``uint32``) of the key from which every step's dropout key is derived.
    """
    params_key, init_dropout_key, rng = jax.random.split(jax.random.key(seed), 3)

    @jax.jit
    def init(x: jax.Array) -> dict[str, PyTree]:
        variables = model.init(
            {"params": params_key, "dropout": init_dropout_key}, x, deterministic=True
        )
        params = variables["params"]
        return {
            "params": params,
            "batch_stats": variables.get("batch_stats", {}),
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(rng),
        }

    return init(sample)


def make_train_step(
    model: SequenceClassifier, tx: optax.GradientTransformation
) -> Callable[..., tuple[dict[str, PyTree], jax.Array, jax.Array]]:
    """A jitted ``train_step(state, x_all, y_all, rows, step) -> (state, loss, accuracy)``.

    ``x_all (N, T, C)`` and ``y_all (N,)`` are the training rows (on the device), ``rows (B,)``
    the indices of this batch, ``step`` the global step number (from 0): the dropout key is
    ``fold_in(state["rng"], step)``. ``loss`` and ``accuracy`` are the batch means.
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
        return per_example_loss(logits, y).mean(), (updates.get("batch_stats", {}), accuracy)

    @jax.jit
    def train_step(
        state: dict[str, PyTree], x_all: jax.Array, y_all: jax.Array, rows: jax.Array, step: int
    ) -> tuple[dict[str, PyTree], jax.Array, jax.Array]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (batch_stats, accuracy)), grads = grad_fn(
            state["params"], state["batch_stats"], x_all[rows], y_all[rows], key
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {**state, "params": params, "batch_stats": batch_stats}
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
    """

    loss: float | None
    accuracy: float
    predictions: np.ndarray
    diverged: int


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
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Loss sum, predictions ``(B,)`` and diverged-row count of the rows ``mask`` keeps."""
        logits = model.apply(variables, x, deterministic=True)
        return (
            jnp.sum(jnp.where(mask > 0, per_example_loss(logits, y), 0.0)),
            jnp.argmax(logits, axis=-1),
            jnp.sum(diverged_rows(logits) & (mask > 0)),
        )

    def evaluate(variables: PyTree, split: Split) -> SplitResult:
        rows = len(split.y)
        padded = math.ceil(rows / batch_size) * batch_size
        x = np.zeros((padded, *split.x.shape[1:]), split.x.dtype)
        x[:rows] = split.x
        y = np.zeros(padded, np.int32)
        y[:rows] = split.y
        mask = (np.arange(padded) < rows).astype(np.float32)
        loss_sum, predictions, diverged = 0.0, [], 0
        for start in range(0, padded, batch_size):
            batch = slice(start, start + batch_size)
            batch_loss, batch_predictions, batch_diverged = eval_batch(
                variables, x[batch], y[batch], mask[batch]
            )
            loss_sum += float(batch_loss)
            predictions.append(np.asarray(batch_predictions))
            diverged += int(batch_diverged)
        predicted = np.concatenate(predictions)[:rows]
        accuracy = float(np.mean(predicted == split.y))
        loss = loss_sum / rows
        return SplitResult(loss if math.isfinite(loss) else None, accuracy, predicted, diverged)

    return evaluate


def model_variables(state: dict[str, PyTree]) -> PyTree:
    """The Flax variables (params and batch statistics) of a training state."""
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


# ------------------------------------------------------------------------------------------------
# The run


def _default_out(config: TrainConfig) -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return pathlib.Path("runs") / f"{stamp}-{config.model}"


def absolute_path(path: str | os.PathLike[str]) -> str:
    """``path`` absolute, ``~`` expanded: what config.json and sweep trials store, so that a run
    resumed or evaluated, or a trial run, in another working directory finds it."""
    return str(pathlib.Path(path).expanduser().absolute())


def absolute_dataset_spec(spec: str) -> str:
    """``npz:PATH`` with PATH made :func:`absolute_path`; other specs as they are."""
    if spec.startswith("npz:"):
        return "npz:" + absolute_path(spec.removeprefix("npz:"))
    return spec


def _check_same_config(saved: dict[str, Any], config: TrainConfig, where: pathlib.Path) -> None:
    """Raises ConfigError naming every field (outside RUN_FIELDS) that differs from ``saved``."""
    saved = with_settings_of_older_runs(saved)
    current = config.to_dict()
    differences = [
        f"{name}: {saved.get(name, '<absent>')!r} in the run, {current.get(name, '<absent>')!r} now"
        for name in sorted(set(saved) | set(current))
        if name not in RUN_FIELDS and saved.get(name) != current.get(name)
    ]
    if differences:
        raise ConfigError(
            f"cannot resume {where}: its configuration differs in "
            + "; ".join(differences)
            + " (start a new run with another --out, or use the run's values)"
        )


def _write_json_atomically(path: pathlib.Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _write_metrics_file(path: pathlib.Path, history: Sequence[dict[str, Any]]) -> None:
    """Rewrites ``metrics.jsonl`` with exactly ``history`` (e.g. the epochs a checkpoint holds)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in history))
    os.replace(tmp, path)


def _check_training_loss(loss: float, *, epoch: int, step: int) -> None:
    """Raises :class:`NonFiniteLossError` if the training loss of ``epoch``'s ``step`` is NaN or
    infinite; the checkpoint of the previous epoch is the last good state."""
    if not math.isfinite(loss):
        kept = (
            f"the last good state is the checkpoint of epoch {epoch - 1}, left as it was"
            if epoch > 1
            else "no epoch had completed, so there is no checkpoint"
        )
        raise NonFiniteLossError(
            f"the training loss is {loss} at epoch {epoch}, step {step}; stopping: {kept}.",
            epoch=epoch,
            step=step,
            value=loss,
        )


def train(
    config: TrainConfig, *, resume: bool = False, epoch_callback: EpochCallback | None = None
) -> dict[str, Any]:
    """Runs a whole training: data, model, epochs with checkpoints, final report.

    Args:
        config: the run's settings; ``config.out`` None means ``runs/<date>-<time>-<model>``.
        resume: continue the run in ``config.out`` from its latest good checkpoint (an empty or
            absent folder starts from scratch). Without it, a folder that already holds
            checkpoints is refused.
        epoch_callback: called after every epoch, once that epoch's checkpoint is on disk, as
            ``epoch_callback(metrics, checkpoint_dir)``: ``metrics`` is the epoch's line of
            ``metrics.jsonl`` (``epoch``, ``train_loss``, ``train_accuracy``, ``val_loss``,
            ``val_accuracy``, ``val_diverged`` (these three None without validation split),
            ``test_loss``, ``test_accuracy``, ``test_diverged``, ``learning_rate``,
            ``epoch_seconds``; ``*_diverged`` count the rows whose logits diverged, see
            :func:`diverged_rows`; an evaluation loss that is not finite is None and does not
            stop the run), ``checkpoint_dir`` that epoch's folder
            ``OUT/checkpoints/<epoch>``.

    Returns:
        The report (also written to ``OUT/report.json``; see :func:`experiments.report.build`).

    Raises:
        ConfigError: invalid configuration, existing checkpoints without ``resume``, or a run to
            resume whose configuration differs.
        NonFiniteLossError: the training loss became NaN or infinite (the last good checkpoint
            is kept).
        larnn_jax.data.DataError: unusable data.
    """
    started = time.perf_counter()
    if resume and config.out is None:
        raise ConfigError("resuming needs the run folder (out)")
    out = pathlib.Path(absolute_path(config.out or _default_out(config)))
    config = dataclasses.replace(
        config,
        out=str(out),
        dataset=absolute_dataset_spec(config.dataset),
        data_dir=None if config.data_dir is None else absolute_path(config.data_dir),
    )
    config_path = out / "config.json"
    if resume and config_path.is_file():
        _check_same_config(json.loads(config_path.read_text()), config, out)
    out.mkdir(parents=True, exist_ok=True)
    with CheckpointStore(out / "checkpoints") as store:
        if store.latest_step() is not None and not resume:
            raise ConfigError(
                f"{out} already holds checkpoints; resume it (--resume) or choose another --out"
            )
        return _train_in(out, config, store, started, epoch_callback)


def _train_in(
    out: pathlib.Path,
    config: TrainConfig,
    store: CheckpointStore,
    started: float,
    epoch_callback: EpochCallback | None,
) -> dict[str, Any]:
    """The body of :func:`train`, with the run folder prepared and its checkpoints open."""
    dataset = load_config_dataset(config)
    steps_per_epoch = len(dataset.train.y) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size {config.batch_size} exceeds the {len(dataset.train.y)} training rows"
        )
    check_checkpoint_every(config.checkpoint_every, dataset)
    model = build_model(config, dataset.num_classes)
    tx = make_optimizer(config, steps_per_epoch)
    state = init_state(model, tx, jnp.asarray(dataset.train.x[:1]), config.seed)

    history: list[dict[str, Any]] = []
    selected_predictions: list[int] | None = None
    latest = store.latest_step()
    if latest is not None:
        state, meta = store.restore(
            latest,
            state,
            check_meta=lambda meta: _check_same_config(meta["config"], config, out),
        )
        history, selected_predictions = meta["history"], meta["selected_test_predictions"]
        log.info("resuming %s from the checkpoint of epoch %d", out, latest)
    elif (out / "config.json").is_file():
        log.info("no checkpoint in %s: starting from epoch 1", out)
    _write_json_atomically(out / "config.json", config.to_dict())
    metrics_path = out / "metrics.jsonl"
    _write_metrics_file(metrics_path, history)

    schedule = learning_rate_schedule(config, steps_per_epoch)
    train_step = make_train_step(model, tx)
    evaluate = make_evaluator(model, config.batch_size)
    x_all, y_all = jax.device_put(dataset.train.x), jax.device_put(dataset.train.y)
    show_progress = config.progress and sys.stderr.isatty()

    for epoch in range(len(history) + 1, config.epochs + 1):
        epoch_started = time.perf_counter()
        order = np.random.default_rng((config.seed, epoch)).permutation(len(dataset.train.y))
        batches = order[: steps_per_epoch * config.batch_size].reshape(steps_per_epoch, -1)
        first_step = (epoch - 1) * steps_per_epoch
        losses, accuracies = [], []
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{config.epochs}",
            disable=not show_progress,
            leave=False,
        )
        for index, rows in enumerate(batches):
            state, loss, accuracy = train_step(
                state, x_all, y_all, jnp.asarray(rows, jnp.int32), first_step + index
            )
            losses.append(float(loss))
            accuracies.append(float(accuracy))
            _check_training_loss(losses[-1], epoch=epoch, step=index + 1)
            bar.update()
            bar.set_postfix(
                loss=f"{np.mean(losses):.4f}", acc=f"{np.mean(accuracies):.4f}", refresh=False
            )
        bar.close()

        variables = model_variables(state)
        val = evaluate(variables, dataset.val) if dataset.val is not None else None
        test = evaluate(variables, dataset.test)
        metrics = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "train_accuracy": float(np.mean(accuracies)),
            "val_loss": val.loss if val is not None else None,
            "val_accuracy": val.accuracy if val is not None else None,
            "val_diverged": val.diverged if val is not None else None,
            "test_loss": test.loss,
            "test_accuracy": test.accuracy,
            "test_diverged": test.diverged,
            "learning_rate": float(schedule(first_step)),
            "epoch_seconds": time.perf_counter() - epoch_started,
        }
        history.append(metrics)
        if report.select_epoch(history) == epoch:
            selected_predictions = test.predictions.tolist()
        meta = {
            "epoch": epoch,
            "config": config.to_dict(),
            "history": history,
            "selected_test_predictions": selected_predictions,
        }
        store.save(epoch, state, meta, report.selection_score(metrics))
        print(json.dumps(metrics), flush=True)
        with metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if epoch_callback is not None:
            epoch_callback(dict(metrics), store.step_dir(epoch))

    figures = report.build(
        run=out,
        config=config.to_dict(),
        dataset=dataset,
        history=history,
        test_predictions=np.asarray(selected_predictions),
        parameter_count=sum(leaf.size for leaf in jax.tree.leaves(state["params"])),
        wall_seconds=time.perf_counter() - started,
    )
    report.write(out, figures, history)
    return figures


# ------------------------------------------------------------------------------------------------
# Command line


_METAVARS = {int: "N", float: "X", str: "TEXT"}


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: one flag per TrainConfig field, plus --config and --resume.

    Every field flag defaults to "not given" so that flags override ``--config`` values, which
    override the TrainConfig defaults.
    """
    parser = argparse.ArgumentParser(
        prog="python -m experiments.train",
        description=__doc__.split("\n\n")[0],
        epilog=(
            "Precedence: command-line flags > --config file > defaults (the paper's best UCI HAR "
            "configuration). Per-epoch metrics go to stdout and OUT/metrics.jsonl."
        ),
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="JSON object of settings, keys = the long flag names with '_' for '-' (e.g. "
        '{"learning_rate": 0.005, "residual_stacking": false}); unknown keys are an error',
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest good checkpoint (its configuration "
        "must match, except --epochs, --checkpoint-every, --data-dir and --progress)",
    )
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        shown = "on" if default is True else "off" if default is False else default
        options: dict[str, Any] = {
            "dest": field.name,
            "default": argparse.SUPPRESS,
            # A None default is explained by the help text itself.
            "help": field.metadata["help"] + ("" if default is None else f" (default: {shown})"),
        }
        if hints[field.name] is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            kind = next(t for t in (int, float, str) if t in _types(hints[field.name]))
            options["type"] = kind
            options["choices"] = field.metadata.get("choices")
            if options["choices"] is None:
                options["metavar"] = field.metadata.get("metavar", _METAVARS[kind])
        parser.add_argument(flag, **options)
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool]:
    """Parses the command line into ``(config, resume)``.

    Raises:
        ConfigError: a bad config file or invalid values.
    """
    args = vars(build_parser().parse_args(argv))
    config_file, resume = args.pop("config"), args.pop("resume")
    values = load_config_file(config_file) if config_file else {}
    return TrainConfig.from_dict({**values, **args}), resume


def configure_logging() -> None:
    """Command-line logging: warnings from everything, progress notes from ``experiments``."""
    # force: importing Orbax already attached a bare handler to the root logger.
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("experiments").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 success, 1 failed run, 2 usage)."""
    configure_logging()
    try:
        config, resume = config_from_args(argv)
        result = train(config, resume=resume)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"report": str(pathlib.Path(result["run"]) / "report.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
