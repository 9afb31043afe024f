"""A trained run restored from its checkpoint: its configuration, its model and its state.

* :func:`open_checkpoint` finds the checkpoint of a run folder (the selected epoch, or a given
  one) and reads the run's configuration from it;
* :meth:`OpenCheckpoint.restore_model` rebuilds the classifier and restores its training state;
* :func:`restore_run` does both and loads the run's data (evaluation);
* :func:`add_checkpoint_arguments`: the command-line arguments that name a checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import pathlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from experiments import report
from experiments.checkpoints import (
    MANIFEST_NAME,
    CheckpointError,
    CheckpointStore,
    discover_checkpoint_dir,
)
from experiments.config import TrainConfig, load_config_dataset
from experiments.data import Dataset
from experiments.steps import (
    SplitResult,
    build_model,
    init_state,
    make_evaluator,
    make_optimizer,
    model_variables,
)
from larnn_jax.models import SequenceClassifier
from larnn_jax.typing import PyTree

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """A model restored from a checkpoint, with what is needed to use it.

    Attributes:
        config: the run's configuration (``data_dir`` possibly overridden).
        dataset: the run's dataset, loaded and preprocessed as in training.
        model: the classifier.
        state: the training state (``params``, ``batch_stats``, ``opt_state``, ``rng``).
        epoch: the epoch the checkpoint was saved after.
        checkpoint_dir: the checkpoint's step folder.
    """

    config: TrainConfig
    dataset: Dataset
    model: SequenceClassifier
    state: dict[str, PyTree]
    epoch: int
    checkpoint_dir: pathlib.Path

    def evaluate_test(self) -> SplitResult:
        """The model, in evaluation mode, on the test set
        (:func:`experiments.steps.make_evaluator`)."""
        evaluate = make_evaluator(self.model, self.config.batch_size)
        return evaluate(model_variables(self.state), self.dataset.test)


@dataclasses.dataclass(frozen=True)
class OpenCheckpoint:
    """The checkpoint of a run that a model is restored from, its store open for reading.

    Attributes:
        store: the run's checkpoint store (read-only).
        step: the epoch whose checkpoint is used.
        config: the run's configuration (``data_dir`` possibly overridden).
    """

    store: CheckpointStore
    step: int
    config: TrainConfig

    @property
    def run_dir(self) -> pathlib.Path:
        """The run folder ``OUT``."""
        return self.store.directory.parent

    @property
    def step_dir(self) -> pathlib.Path:
        """The checkpoint's step folder."""
        return self.store.step_dir(self.step)

    def restore_model(
        self, num_classes: int, sample: np.ndarray
    ) -> tuple[SequenceClassifier, dict[str, PyTree]]:
        """The run's classifier and its training state from this checkpoint.

        Args:
            num_classes: the number of classes of the run's dataset.
            sample: an input batch ``(B, T, C)`` of the run's data (only its shape and dtype
                matter).

        Raises:
            CheckpointError: the checkpoint does not fit the model.
        """
        model = build_model(self.config, num_classes)
        # Only the structure of the optimiser state matters here, not its schedule.
        tx = make_optimizer(self.config, steps_per_epoch=1)
        target = jax.eval_shape(
            lambda x: init_state(model, tx, x, self.config.seed, average=self.config.ema_decay > 0),
            jnp.asarray(sample),
        )
        state, _ = self.store.restore(self.step, target)
        return model, state


@contextlib.contextmanager
def open_checkpoint(
    checkpoint: os.PathLike | str, *, step: int | None = None, data_dir: str | None = None
) -> Iterator[OpenCheckpoint]:
    """Finds the checkpoint to restore and reads the run's configuration from it; a context
    manager that keeps the store open. Once the checkpoint is found, a warning names every
    other one that is unusable (damaged, or its save never completed).

    Args:
        checkpoint: a run folder, its ``checkpoints`` folder, or one step folder in it.
        step: the epoch whose checkpoint to use; default: the step folder given, else the run's
            selected epoch (:func:`experiments.report.select_epoch`).
        data_dir: where the dataset lives, if not where the run found it.

    Raises:
        CheckpointError: no usable checkpoint, the requested step is absent or bad, or (no step
            requested) the selected epoch's checkpoint is unusable or cannot be told.
    """
    directory, step_in_path = discover_checkpoint_dir(checkpoint)
    with CheckpointStore(directory, read_only=True) as store:
        latest = store.latest_step()
        if latest is None:
            raise CheckpointError(f"no usable checkpoint in {directory}")
        _, meta = store.restore(latest)
        step = step if step is not None else step_in_path
        if step is None:
            step = _selected_epoch(store, meta["history"])
        store.restore(step)  # CheckpointError now if that step is absent or bad
        for bad, problem in sorted(store.bad_steps.items()):
            log.warning("checkpoint step %d in %s is unusable: %s", bad, directory, problem)
        config = TrainConfig.from_saved(meta["config"])
        if data_dir is not None:
            config = dataclasses.replace(config, data_dir=data_dir)
        yield OpenCheckpoint(store, step, config)


def _selected_epoch(store: CheckpointStore, history: list[dict]) -> int:
    """The run's selected epoch (:func:`experiments.report.select_epoch` over ``history``, the
    metrics of the latest good checkpoint), if its checkpoint is usable.

    Raises:
        CheckpointError: the selected epoch's checkpoint is unusable, or a later checkpoint,
            completed and then damaged, held metrics that could change the selection: another
            epoch is never used in its place unasked.
    """
    usable = ", ".join(map(str, store.steps()))
    latest = store.latest_step()
    damaged = [
        step
        for step in store.bad_steps
        if step > (latest or 0) and (store.step_dir(step) / MANIFEST_NAME).is_file()
    ]
    if damaged:
        step = max(damaged)
        raise CheckpointError(
            f"the checkpoint of epoch {step} in {store.directory} is unusable "
            f"({store.bad_steps[step]}), so the run's selected epoch cannot be told from the "
            f"older ones; choose an epoch with --step (usable: {usable})"
        )
    selected = report.select_epoch(history)
    if selected not in store.steps():
        problem = store.bad_steps.get(selected, "it was not kept")
        raise CheckpointError(
            f"the run's selected epoch, {selected}, has no usable checkpoint in "
            f"{store.directory} ({problem}); choose an epoch with --step (usable: {usable})"
        )
    return selected


def restore_run(
    checkpoint: os.PathLike | str, *, step: int | None = None, data_dir: str | None = None
) -> RestoredRun:
    """Restores a model, its configuration and its data from a checkpoint.

    Args:
        checkpoint, step, data_dir: as for :func:`open_checkpoint`.

    Raises:
        CheckpointError: no usable checkpoint, or the requested step is absent or bad.
    """
    with open_checkpoint(checkpoint, step=step, data_dir=data_dir) as opened:
        dataset = load_config_dataset(opened.config)
        model, state = opened.restore_model(dataset.num_classes, dataset.test.x[:1])
        return RestoredRun(opened.config, dataset, model, state, opened.step, opened.step_dir)


def add_checkpoint_arguments(
    parser: argparse.ArgumentParser, verb: str, *, required: bool = True
) -> None:
    """The arguments of :func:`open_checkpoint`: ``--checkpoint`` (``required`` or not),
    ``--step`` and ``--data-dir`` (``verb``: what the command does with the checkpoint)."""
    parser.add_argument(
        "--checkpoint",
        required=required,
        metavar="DIR",
        help="a run folder (OUT), its checkpoints folder, or one step folder OUT/checkpoints/N",
    )
    parser.add_argument(
        "--step",
        type=int,
        metavar="N",
        help=f"{verb} the checkpoint of epoch N (default: the run's epoch selected by "
        "validation accuracy)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder that holds 'UCI HAR Dataset/' (default: the run's, else $LARNN_DATA_DIR)",
    )
