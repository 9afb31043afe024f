"""Train a LARNN (or a baseline) sequence classifier on UCI HAR (default) or a .npz dataset.

    python -m experiments.train                         # the paper's LARNN, the recommended recipe
    python -m experiments.train --recipe paper          # ... trained as the paper trains it
    python -m experiments.train --epochs 10 --out runs/try
    python -m experiments.train --out runs/try --resume  # continue after an interruption
    python -m experiments.train --config sweep.json --seed 3

Everything a run produces goes to its folder ``OUT``:

    config.json            the full configuration (TrainConfig fields)
    preprocessing.json     the input standardisation and class names, for predictions on new
                           data (see experiments/preprocessing.py)
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
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments import cli, report
from experiments.checkpoints import (
    CheckpointError,
    CheckpointSaveError,
    CheckpointStore,
    holds_checkpoints,
)
from experiments.config import (
    DEFAULT_RECIPE,
    RECIPES,
    ConfigError,
    TrainConfig,
    absolute_dataset_spec,
    absolute_path,
    add_field_arguments,
    check_remat_chunk_length,
    check_same_config,
    config_differences,
    load_config_dataset,
    load_config_file,
    recipe_text,
    with_current_names,
)
from experiments.data import DataError, Dataset, Split
from experiments.files import atomic_write, write_text_atomically
from experiments.preprocessing import PREPROCESSING_FILE, Preprocessing
from experiments.steps import (
    STATISTICS_BATCHES,
    SplitResult,
    build_augmentation,
    build_model,
    init_state,
    learning_rate_schedule,
    make_evaluator,
    make_optimizer,
    make_statistics_estimator,
    make_train_step,
    model_variables,
)
from larnn_jax.typing import PyTree

log = logging.getLogger("experiments.train")  # not __name__: that is "__main__" under -m

#: ``epoch_callback(metrics, checkpoint_dir)``: called after each epoch's checkpoint is on disk.
EpochCallback = Callable[[dict[str, Any], pathlib.Path], None]


class RunOptions(TypedDict):
    """The keyword arguments of :func:`train` that the command line sets beside the config."""

    resume: bool
    overwrite: bool


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped without saving the bad state.

    (A non-finite evaluation loss does not stop a run: see
    :func:`experiments.steps.diverged_rows`.)

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


# ------------------------------------------------------------------------------------------------
# The run


def _default_out(config: TrainConfig) -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return pathlib.Path("runs") / f"{stamp}-{config.model}"


def _write_json(path: pathlib.Path, payload: Any) -> None:
    """Writes ``payload`` as indented JSON, whole or not at all."""
    write_text_atomically(path, json.dumps(payload, indent=2) + "\n")


def _write_metrics_file(path: pathlib.Path, history: Sequence[dict[str, Any]]) -> None:
    """Rewrites ``metrics.jsonl`` with exactly ``history`` (e.g. the epochs a checkpoint holds)."""
    with atomic_write(path) as file:
        file.writelines(json.dumps(line) + "\n" for line in history)


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


#: Keys in the config.json of every run, since the first version of the file (a run writes all of
#: its fields; later fields may be absent from older runs).
_KEYS_EVERY_RUN_WRITES = frozenset({"model", "epochs", "seed"})


def _saved_config(path: pathlib.Path) -> dict[str, Any]:
    """The configuration of the run that saved ``path`` (its ``config.json``).

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not a run's configuration (another program's ``config.json``): not
            JSON, not an object, keys or values that no run has, or without the keys every run
            writes (``{}``); the message says which.
    """
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err})") from err
    if not isinstance(saved, dict):
        raise ValueError("not a JSON object")
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(with_current_names(saved)) - fields)
    if unknown:
        raise ValueError(f"keys that no run has: {', '.join(unknown)}")
    missing = sorted(_KEYS_EVERY_RUN_WRITES - set(saved))
    if missing:
        raise ValueError(f"keys that every run writes are missing: {', '.join(missing)}")
    TrainConfig.from_saved(saved)  # ConfigError, a ValueError: a value that no run has
    return saved


def _check_run_folder(
    out: pathlib.Path, config: TrainConfig, *, resume: bool, overwrite: bool
) -> None:
    """Raises ConfigError unless the folder ``out`` may receive this run; touches nothing.

    ``out`` holds a run when its ``config.json`` is a run's configuration, or its
    ``checkpoints/`` holds a saved step (a run's checkpoints copied without the rest).

    * ``out`` must not be a file.
    * Resuming, ``out`` must hold a run, with the same configuration
      (:func:`~experiments.config.check_same_config`).
    * Otherwise ``out`` must be absent or empty (an empty ``checkpoints/`` aside: a run stopped
      before it wrote anything else), or hold this run before its first checkpoint (the same
      configuration: it starts again), unless ``overwrite``; a run's folder with checkpoints is
      refused later, when they are open.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a run folder; choose another --out")
    config_path = out / "config.json"
    saved, not_a_run = None, "no config.json"
    try:
        saved = _saved_config(config_path) if config_path.is_file() else None
    except OSError as err:
        raise ConfigError(f"{config_path}: cannot read it ({err})") from err
    except ValueError as err:
        not_a_run = f"its config.json is not a run's configuration: {err}"
    checkpoints = out / "checkpoints"
    if resume:
        if saved is None and not holds_checkpoints(checkpoints):
            found = "does not exist" if not out.exists() else f"holds no run ({not_a_run})"
            raise ConfigError(
                f"nothing to resume: {out} {found}; check --out, or start a new run there "
                "without --resume"
            )
        if saved is not None:
            check_same_config(saved, config, out)
        return
    if overwrite or not out.is_dir():
        return
    if saved is None and holds_checkpoints(checkpoints):
        return  # refused once its checkpoints are open: they are resumed, not overwritten
    if saved is not None:
        differences = config_differences(saved, config)
        if not differences:
            return
        found = "another run (its configuration differs in " + "; ".join(differences) + ")"
    else:
        entries = sorted(
            path.name
            for path in out.iterdir()
            if not (path == checkpoints and path.is_dir() and not any(path.iterdir()))
        )
        if not entries:
            return
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        found = f"{len(entries)} other file(s) and folder(s) ({shown})"
    raise ConfigError(
        f"{out} already exists and holds {found}; choose another --out, or --overwrite to "
        "write this run into it (replacing its files of the same names)"
    )


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    epoch_callback: EpochCallback | None = None,
) -> dict[str, Any]:
    """Runs a whole training: data, model, epochs with checkpoints, final report.

    Args:
        config: the run's settings; ``config.out`` None means ``runs/<date>-<time>-<model>``.
        resume: continue the run in ``config.out`` from its latest good checkpoint (a run
            folder without one starts from epoch 1); a folder without a run is refused.
            Without it, a folder that already holds checkpoints is refused.
        overwrite: let ``config.out`` be an existing folder that holds other files (those of
            the run's names are replaced); without it, only an absent or empty folder, or one
            that holds this run before its first checkpoint, is used.
        epoch_callback: called after every epoch, once that epoch's checkpoint is on disk, as
            ``epoch_callback(metrics, checkpoint_dir)``: ``metrics`` is the epoch's line of
            ``metrics.jsonl`` (``epoch``, ``train_loss``, ``train_accuracy``, ``val_loss``,
            ``val_accuracy``, ``val_diverged`` (these three None without validation split),
            ``test_loss``, ``test_accuracy``, ``test_diverged``, ``learning_rate``,
            ``epoch_seconds``; ``*_diverged`` count the rows whose logits diverged, see
            :func:`experiments.steps.diverged_rows`; an evaluation loss that is not finite is None and does not
            stop the run; ``val_subject_accuracy``: ``{subject: accuracy}`` on the validation
            rows, where their subjects are known; with ``ema_decay``, the evaluations are those
            of the averaged weights, and ``raw_val_accuracy``, ``raw_test_accuracy`` (and
            ``raw_val_subject_accuracy``) those of the raw weights),
            ``checkpoint_dir`` that epoch's folder
            ``OUT/checkpoints/<epoch>``.

    Returns:
        The report (also written to ``OUT/report.json``; see :func:`experiments.report.build`).

    Raises:
        ConfigError: invalid configuration, an unusable run folder (see ``resume`` and
            ``overwrite``), or a run to resume whose configuration differs.
        NonFiniteLossError: the training loss became NaN or infinite (the last good checkpoint
            is kept).
        experiments.data.DataError: unusable data.
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
    _check_run_folder(out, config, resume=resume, overwrite=overwrite)
    # The data and the settings that depend on it are checked before anything is written.
    dataset = load_config_dataset(config)
    steps_per_epoch = _steps_per_epoch(config, dataset)
    check_remat_chunk_length(config.remat_chunk_length, dataset)
    out.mkdir(parents=True, exist_ok=True)
    with CheckpointStore(out / "checkpoints") as store:
        if store.latest_step() is not None and not resume:
            raise ConfigError(
                f"{out} already holds checkpoints; resume it (--resume) or choose another --out"
            )
        return _train_in(out, config, dataset, steps_per_epoch, store, started, epoch_callback)


@dataclasses.dataclass
class _Progress:
    """What a run's completed epochs left: every epoch's metrics (the lines of ``metrics.jsonl``)
    and the test predictions of the epoch selected so far."""

    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    selected_predictions: list[int] | None = None

    def record(self, metrics: dict[str, Any], test_predictions: np.ndarray) -> None:
        """Adds an epoch's metrics; keeps its test predictions if it is now the selected one."""
        self.history.append(metrics)
        if report.select_epoch(self.history) == metrics["epoch"]:
            self.selected_predictions = test_predictions.tolist()

    def checkpoint_meta(self, config: TrainConfig) -> dict[str, Any]:
        """The metadata saved with the latest epoch's checkpoint (from which a resumed run
        restores this progress)."""
        return {
            "epoch": self.history[-1]["epoch"],
            "config": config.to_dict(),
            "history": self.history,
            "selected_test_predictions": self.selected_predictions,
        }


def _restore_progress(
    out: pathlib.Path, config: TrainConfig, store: CheckpointStore, state: dict[str, PyTree]
) -> tuple[dict[str, PyTree], _Progress]:
    """The state and progress of the latest good checkpoint in ``store`` (``state`` and no
    progress when there is none), after checking that its configuration is ``config``'s."""
    latest = store.latest_step()
    if latest is None:
        if (out / "config.json").is_file():
            log.info("no checkpoint in %s: starting from epoch 1", out)
        return state, _Progress()
    state, meta = store.restore(
        latest, state, check_meta=lambda meta: check_same_config(meta["config"], config, out)
    )
    log.info("resuming %s from the checkpoint of epoch %d", out, latest)
    return state, _Progress(meta["history"], meta["selected_test_predictions"])


def _steps_per_epoch(config: TrainConfig, dataset: Dataset) -> int:
    """Training steps per epoch: full batches of the training rows (ConfigError if none)."""
    steps = len(dataset.train.y) // config.batch_size
    if steps == 0:
        raise ConfigError(
            f"batch_size {config.batch_size} exceeds the {len(dataset.train.y)} training rows"
        )
    return steps


def _epoch_batches(config: TrainConfig, epoch: int, rows: int, steps_per_epoch: int) -> np.ndarray:
    """The training rows of each step of ``epoch`` ``(steps_per_epoch, batch_size)``: a
    permutation of the ``rows`` training rows drawn from the seed and the epoch."""
    order = np.random.default_rng((config.seed, epoch)).permutation(rows)
    return order[: steps_per_epoch * config.batch_size].reshape(steps_per_epoch, -1)


def _train_epoch(
    train_step: Callable[..., tuple[dict[str, PyTree], jax.Array, jax.Array]],
    state: dict[str, PyTree],
    training_rows: tuple[jax.Array, jax.Array],
    config: TrainConfig,
    epoch: int,
    steps_per_epoch: int,
) -> tuple[dict[str, PyTree], tuple[float, float]]:
    """Runs ``epoch``'s training steps over a permutation of the training rows (drawn from the
    seed and the epoch); returns the state after them and the steps' mean loss and accuracy.

    Raises:
        NonFiniteLossError: a step's loss is NaN or infinite.
    """
    x_all, y_all = training_rows
    batches = _epoch_batches(config, epoch, len(y_all), steps_per_epoch)
    first_step = (epoch - 1) * steps_per_epoch
    losses, accuracies = [], []
    bar = tqdm(
        total=steps_per_epoch,
        desc=f"epoch {epoch}/{config.epochs}",
        disable=not (config.progress and sys.stderr.isatty()),
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
    return state, (float(np.mean(losses)), float(np.mean(accuracies)))


def _epoch_metrics(
    epoch: int,
    train: tuple[float, float],
    val: SplitResult | None,
    test: SplitResult,
    learning_rate: float,
    seconds: float,
    val_split: Split | None = None,
    raw: tuple[SplitResult | None, SplitResult] | None = None,
) -> dict[str, Any]:
    """An epoch's line of ``metrics.jsonl`` (see :func:`train`); ``train`` is the mean training
    loss and accuracy; ``val_split`` the validation rows (their subjects, where known, give
    per-subject validation accuracies); ``raw`` the validation and test results of the raw
    weights, where the run's model is their moving average."""

    def by_subject(result: SplitResult | None) -> dict[str, float] | None:
        if result is None or val_split is None or val_split.subjects is None:
            return None
        return report.per_subject_accuracy(val_split.y, result.predictions, val_split.subjects)

    extra: dict[str, Any] = {}
    if by_subject(val) is not None:
        extra["val_subject_accuracy"] = by_subject(val)
    if raw is not None:
        extra["raw_val_accuracy"] = raw[0].accuracy if raw[0] is not None else None
        extra["raw_test_accuracy"] = raw[1].accuracy
        if by_subject(raw[0]) is not None:
            extra["raw_val_subject_accuracy"] = by_subject(raw[0])
    return {
        "epoch": epoch,
        "train_loss": train[0],
        "train_accuracy": train[1],
        "val_loss": val.loss if val is not None else None,
        "val_accuracy": val.accuracy if val is not None else None,
        "val_diverged": val.diverged if val is not None else None,
        "test_loss": test.loss,
        "test_accuracy": test.accuracy,
        "test_diverged": test.diverged,
        "learning_rate": learning_rate,
        **extra,
        "epoch_seconds": seconds,
    }


def _train_in(
    out: pathlib.Path,
    config: TrainConfig,
    dataset: Dataset,
    steps_per_epoch: int,
    store: CheckpointStore,
    started: float,
    epoch_callback: EpochCallback | None,
) -> dict[str, Any]:
    """The body of :func:`train`, with the data loaded, the run folder prepared and its
    checkpoints open."""
    model = build_model(config, dataset.num_classes)
    tx = make_optimizer(config, steps_per_epoch)
    averaged = config.ema_decay > 0
    sample = jnp.asarray(dataset.train.x[:1])
    state = init_state(model, tx, sample, config.seed, average=averaged)
    state, progress = _restore_progress(out, config, store, state)
    finished = out / report.REPORT_FILE
    if len(progress.history) >= config.epochs and finished.is_file():
        # A finished run resumed again: its report stands (rebuilt, it would give this call's
        # few seconds as the run's wall time).
        return json.loads(finished.read_text())
    _write_json(out / "config.json", config.to_dict())
    _write_json(out / PREPROCESSING_FILE, Preprocessing.from_dataset(dataset).to_dict())
    metrics_path = out / "metrics.jsonl"
    _write_metrics_file(metrics_path, progress.history)

    schedule = learning_rate_schedule(config, steps_per_epoch)
    augmentation = build_augmentation(config, dataset)
    train_step = make_train_step(
        model,
        tx,
        augmentation=augmentation,
        label_smoothing=config.label_smoothing,
        ema_decay=config.ema_decay,
    )
    estimate_statistics = make_statistics_estimator(model, augmentation)
    evaluate = make_evaluator(model, config.batch_size)

    def evaluate_splits(variables: PyTree) -> tuple[SplitResult | None, SplitResult]:
        val = evaluate(variables, dataset.val) if dataset.val is not None else None
        return val, evaluate(variables, dataset.test)

    training_rows = jax.device_put(dataset.train.x), jax.device_put(dataset.train.y)
    for epoch in range(len(progress.history) + 1, config.epochs + 1):
        epoch_started = time.perf_counter()
        state, train = _train_epoch(
            train_step, state, training_rows, config, epoch, steps_per_epoch
        )
        raw = None
        if averaged:
            batches = _epoch_batches(config, epoch, len(dataset.train.y), steps_per_epoch)
            state = estimate_statistics(state, *training_rows, batches[:STATISTICS_BATCHES], epoch)
            raw = evaluate_splits(model_variables(state, raw=True))
        val, test = evaluate_splits(model_variables(state))
        learning_rate = float(schedule((epoch - 1) * steps_per_epoch))
        metrics = _epoch_metrics(
            epoch,
            train,
            val,
            test,
            learning_rate,
            time.perf_counter() - epoch_started,
            val_split=dataset.val,
            raw=raw,
        )
        progress.record(metrics, test.predictions)
        store.save(epoch, state, progress.checkpoint_meta(config), report.selection_score(metrics))
        print(json.dumps(metrics), flush=True)
        with metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if epoch_callback is not None:
            epoch_callback(dict(metrics), store.step_dir(epoch))

    figures = report.build(
        run=out,
        config=config.to_dict(),
        dataset=dataset,
        history=progress.history,
        test_predictions=np.asarray(progress.selected_predictions),
        parameter_count=sum(leaf.size for leaf in jax.tree.leaves(state["params"])),
        wall_seconds=time.perf_counter() - started,
    )
    report.write(out, figures, progress.history)
    return figures


# ------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: one flag per TrainConfig field
    (:func:`~experiments.config.add_field_arguments`), plus --recipe, --config, --resume and
    --overwrite."""
    parser = cli.command_parser(
        "experiments.train",
        __doc__,
        epilog=(
            "Precedence: command-line flags > --config file > --recipe > defaults (the paper's "
            "best UCI HAR configuration). Per-epoch metrics go to stdout and OUT/metrics.jsonl."
        ),
    )
    parser.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=DEFAULT_RECIPE,
        help="how to train, a named set of the settings below: "
        + "; ".join(f"{name}: {recipe_text(name)}" for name in RECIPES)
        + " (default: %(default)s; paper: the paper's training to the letter)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="JSON object of settings, keys = the long flag names with '_' for '-' (e.g. "
        '{"learning_rate": 0.005, "residual_stacking": false}); unknown keys are an error',
    )
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest good checkpoint (its configuration "
        "must match, except --epochs, --remat-chunk-length, --data-dir and --progress)",
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="let --out be an existing folder that holds other files: those of the run's names "
        "are replaced (a folder with checkpoints still needs --resume or another --out)",
    )
    add_field_arguments(parser)
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, RunOptions]:
    """Parses the command line into ``(config, options)``, ``options`` being the keyword
    arguments ``resume`` and ``overwrite`` of :func:`train`.

    Raises:
        ConfigError: a bad config file or invalid values.
    """
    args = vars(build_parser().parse_args(argv))
    recipe, config_file = args.pop("recipe"), args.pop("config")
    options: RunOptions = {"resume": args.pop("resume"), "overwrite": args.pop("overwrite")}
    values = load_config_file(config_file) if config_file else {}
    return TrainConfig.from_dict({**RECIPES[recipe], **values, **args}), options


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 success, 1 failed run, 2 usage)."""
    cli.configure_logging()
    try:
        config, options = config_from_args(argv)
        result = train(config, **options)
    except (NonFiniteLossError, DataError, CheckpointSaveError) as err:
        return cli.report_error(err, cli.FAILED)
    except (ConfigError, CheckpointError) as err:
        return cli.report_error(err, cli.USAGE)
    print(json.dumps({"report": str(pathlib.Path(result["run"]) / "report.json")}))
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
