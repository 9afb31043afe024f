"""Hyperparameter sweeps of :func:`experiments.train.train` with Ray Tune, on one machine or many.

    python -m experiments.sweep --space round2 --num-samples 50
    python -m experiments.sweep --space round1 --num-samples 20 --epochs 10 --scheduler fifo
    python -m experiments.sweep --space round2 --num-samples 50 --gpus-per-trial 0.25 \\
        --address auto --storage /shared/sweeps --name r2
    python -m experiments.sweep --storage /shared/sweeps --name r2 --resume   # after a crash

Search: hyperopt's TPE over a space of :mod:`experiments.search_spaces` (the first 20 points are
random, as in hyperopt), seeded by ``--seed``. Scheduling: ASHA (default) stops a trial at a rung
(epoch ``grace·rf^i``) unless its validation accuracy is in the top ``1/rf`` of the trials that
reached that rung, or FIFO runs every trial to its last epoch. Each trial is one call of ``experiments.train.train`` (the same training
as ``python -m experiments.train``), which reports every epoch's metrics and checkpoint to Tune.

Where things go: ``STORAGE/NAME/`` (a local folder, a shared filesystem or an ``s3://``/``gs://``
URI; every node must reach it) holds Tune's experiment state and, per trial, its parameters,
per-epoch results and latest checkpoints. Each trial's own run folder (``config.json``,
``metrics.jsonl``, report, figures) stays in its working directory on the node that ran it.
Analyse with ``python -m experiments.analyze_sweep STORAGE/NAME``. A driver that stops (Ctrl+C, a
crash, a lost connection) leaves an experiment that ``--resume`` continues. Resuming loads the
pickles Tune saved in the folder (its design): a crafted folder runs code, so resume only sweeps
you trust (``experiments.analyze_sweep`` reads JSON and text only).

Several machines: start Ray on each (``ray start --head`` on one, ``ray start --address HEAD:6379``
on the others), install this package everywhere, and pass ``--address auto`` (or ``HEAD:6379``)
and a ``--storage`` that every node can write.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import pathlib
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.hyperopt import HyperOptSearch

from experiments import analyze_sweep, cli
from experiments.config import (
    ConfigError,
    TrainConfig,
    absolute_dataset_spec,
    absolute_path,
    check_remat_chunk_length,
    load_config_dataset,
)
from experiments.data import DataError
from experiments.search_spaces import SearchSpace, get_space, resolve_point
from experiments.train import train
from larnn_jax.scans import SCANS

#: What the sweep maximises: the validation accuracy of each epoch.
METRIC, MODE = "val_accuracy", "max"
#: Tune checkpoints kept per trial (the latest is the one a resumed trial continues from).
CHECKPOINTS_KEPT = 2
DEFAULT_STORAGE = "runs/sweeps"


class SweepError(RuntimeError):
    """A sweep that cannot run as asked (e.g. no validation split, nothing to resume)."""


def device_env(gpus_per_trial: float) -> dict[str, str]:
    """The environment variables trial workers need, set before JAX starts its backend there.

    * no GPU: ``JAX_PLATFORMS=cpu``, so that JAX leaves the machine's GPUs alone (Ray restricts
      ``CUDA_VISIBLE_DEVICES`` only for workers that hold GPUs);
    * a fraction ``g < 1`` of a GPU: no preallocation and a memory cap of ``0.9·g`` of the GPU,
      so that ``1/g`` trials share it;
    * one whole GPU: nothing (JAX sees just the GPU Ray assigned, via ``CUDA_VISIBLE_DEVICES``).
    """
    if gpus_per_trial == 0:
        return {"JAX_PLATFORMS": "cpu"}
    if gpus_per_trial < 1:
        return {
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 * gpus_per_trial:.3f}",
        }
    return {}


def _check_device_env() -> None:
    """Raises SweepError when this worker's environment does not match the GPUs of its trial
    (the driver was started with another ``--gpus-per-trial`` than the trial's)."""
    gpus = tune.get_context().get_trial_resources().required_resources.get("GPU", 0)
    wrong = {
        name: os.environ.get(name)
        for name, value in device_env(gpus).items()
        if os.environ.get(name) != value
    }
    if wrong:
        raise SweepError(
            f"this trial holds {gpus} GPU(s) but its worker has {wrong}: start the sweep driver "
            f"with --gpus-per-trial {gpus} (also when resuming)"
        )


def run_trial(point: dict[str, Any]) -> None:
    """Tune's function trainable: trains the configuration of one point of the space.

    Reports every epoch's metrics (those of ``metrics.jsonl`` plus ``features_requested``,
    ``features`` and ``node_id``, the Ray node that ran the epoch) with that epoch's checkpoint.
    When Tune restores the trial (``--resume``, or after a pause), the checkpoint Tune holds is laid
    back into the run folder, replacing whatever is there, and training resumes from it.
    """
    _check_device_env()
    resolved = resolve_point(point)
    # Tune runs each trial in a working directory of its own on the node (RAY_CHDIR_TO_TRIAL_DIR).
    run_dir = pathlib.Path.cwd() / f"run-{tune.get_context().get_trial_id()}"
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        checkpoint.to_directory(run_dir / "checkpoints")
    extra = {
        "features_requested": resolved.features_requested,
        "features": resolved.config.features,
        "node_id": ray.get_runtime_context().get_node_id(),
    }

    def report_epoch(metrics: dict[str, Any], checkpoint_dir: pathlib.Path) -> None:
        if metrics[METRIC] is None:
            raise SweepError(
                "the dataset has no validation split (validation_subjects/validation_fraction "
                "0?): sweeps select on validation accuracy"
            )
        # The Tune checkpoint holds the epoch's folder under its own name, so that restoring
        # recreates ``checkpoints/<epoch>/``; report() copies it to storage before returning.
        with tempfile.TemporaryDirectory(dir=run_dir) as staging:
            shutil.copytree(checkpoint_dir, pathlib.Path(staging, checkpoint_dir.name))
            tune.report({**metrics, **extra}, checkpoint=tune.Checkpoint.from_directory(staging))

    config = dataclasses.replace(resolved.config, out=str(run_dir), progress=False)
    train(config, resume=checkpoint is not None, epoch_callback=report_epoch)


def make_trainable(cpus_per_trial: float, gpus_per_trial: float) -> Any:
    """:func:`run_trial` with the resources each trial reserves."""
    return tune.with_resources(run_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})


def make_scheduler(
    kind: str, epochs: int, grace_period: int | None = None, reduction_factor: float = 3
) -> TrialScheduler:
    """ASHA over epochs (grace period default ``max(1, epochs // 10)``) or FIFO."""
    if kind == "fifo":
        return FIFOScheduler()
    if kind != "asha":
        raise ConfigError(f"unknown scheduler {kind!r}: asha or fifo")
    grace = grace_period if grace_period is not None else max(1, epochs // 10)
    if not 1 <= grace <= epochs:
        raise ConfigError(f"grace period must be in 1..{epochs} (the epochs); got {grace}")
    return ASHAScheduler(
        time_attr="training_iteration",  # one report per epoch
        max_t=epochs,
        grace_period=grace,
        reduction_factor=reduction_factor,
    )


def trial_dirname(trial: Trial) -> str:
    """A trial's folder name: ``trial_<id>`` (Tune's default spells out the whole config)."""
    return f"trial_{trial.trial_id}"


def default_name(space: SearchSpace, scheduler: str) -> str:
    """``<space>-<scheduler>-<date>-<time>``."""
    return f"{space.name}-{scheduler}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def storage_uri(storage: str) -> str:
    """A URI as it is, a local path made absolute (Tune requires it)."""
    return storage if "://" in storage else absolute_path(storage)


def experiment_path(storage: str, name: str) -> str:
    """Where the experiment ``name`` of ``storage`` lives (folder or URI)."""
    return f"{storage_uri(storage).rstrip('/')}/{name}"


def make_tuner(
    space: SearchSpace,
    *,
    num_samples: int,
    overrides: Mapping[str, Any] | None = None,
    max_concurrent: int | None = None,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    scheduler: str = "asha",
    grace_period: int | None = None,
    reduction_factor: float = 3,
    storage: str = DEFAULT_STORAGE,
    name: str,
    seed: int = 0,
) -> tune.Tuner:
    """A Tuner for a new sweep (call ``fit()`` on it, connected to Ray).

    Args:
        space: the search space.
        num_samples: number of trials.
        overrides: TrainConfig values that replace the space's fixed ones (e.g. epochs, dataset).
        max_concurrent: at most this many trials at once (None: as resources allow).
        cpus_per_trial, gpus_per_trial: the resources each trial reserves.
        scheduler: ``asha`` or ``fifo``; ``grace_period`` and ``reduction_factor`` are ASHA's.
        storage: where the experiment folder goes (local path or URI).
        name: the experiment folder's name (e.g. :func:`default_name`).
        seed: seed of the search (its random points and TPE's draws).
    """
    epochs = space.settings(overrides).get("epochs", TrainConfig.epochs)
    searcher = HyperOptSearch(
        space.hyperopt_space(overrides),
        metric=METRIC,
        mode=MODE,
        points_to_evaluate=[dict(point) for point in space.initial_points] or None,
        random_state_seed=seed,
    )
    search_alg = ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher
    return tune.Tuner(
        make_trainable(cpus_per_trial, gpus_per_trial),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=search_alg,
            scheduler=make_scheduler(scheduler, epochs, grace_period, reduction_factor),
            num_samples=num_samples,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_uri(storage),
            failure_config=tune.FailureConfig(max_failures=0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        ),
    )


def restore_tuner(path: str, *, cpus_per_trial: float = 1, gpus_per_trial: float = 0) -> tune.Tuner:
    """The Tuner of an interrupted sweep: finished and errored trials stay as they are, unfinished
    ones continue from their latest checkpoint, and the search goes on to ``num_samples``.

    Raises:
        SweepError: ``path`` holds no experiment to resume.
    """
    if not tune.Tuner.can_restore(path):
        raise SweepError(f"no Tune experiment to resume at {path}")
    return tune.Tuner.restore(
        path,
        trainable=make_trainable(cpus_per_trial, gpus_per_trial),
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=False,
    )


@contextlib.contextmanager
def ray_connection(address: str | None, gpus_per_trial: float) -> Iterator[None]:
    """Connects to the Ray cluster at ``address`` (None: starts a local one) with
    :func:`device_env` in every worker's environment, and disconnects at the end."""
    ray.init(address=address, runtime_env={"env_vars": device_env(gpus_per_trial)})
    try:
        yield
    finally:
        ray.shutdown()


def summarize(experiment: str, resume: str) -> int:
    """Prints every trial's outcome, the errors and where the results are; ``resume`` is the
    command that resumes the sweep, printed when trials are unfinished (e.g. after Ctrl+C).

    Returns:
        The exit status: 0 when at least one trial finished without error, else 1.
    """
    table = analyze_sweep.trial_table(analyze_sweep.load_experiment(experiment))
    print(analyze_sweep.markdown(table[list(analyze_sweep.SUMMARY_COLUMNS)]))
    errored = table[table["error"] != ""]
    for trial_id, error in zip(errored["trial_id"], errored["error"], strict=True):
        print(f"trial {trial_id} failed: {error}")
    counts = ", ".join(f"{n} {status}" for status, n in table["status"].value_counts().items())
    print(f"{len(table)} trials: {counts}")
    if not table["status"].isin([*analyze_sweep.SUCCEEDED, "error"]).all():
        print(f"unfinished trials: resume with {resume}")
    print(f"results: {experiment}")
    print(f"analyse: python -m experiments.analyze_sweep {experiment}")
    return cli.OK if table["status"].isin(analyze_sweep.SUCCEEDED).any() else cli.FAILED


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = cli.command_parser(
        "experiments.sweep",
        __doc__,
        epilog="Exit status: 0 when at least one trial finished, 1 when all failed, 2 for "
        "invalid arguments. Failed trials are listed with their error; the sweep goes on.",
    )
    parser.add_argument(
        "--space",
        help="search space: round1, round2 (the paper's, docs/model.md §5) or MODULE:ATTRIBUTE naming a "
        "SearchSpace (required unless --resume)",
    )
    parser.add_argument("--num-samples", type=int, default=10, help="trials (default: 10)")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        metavar="M",
        help="at most M trials at once (default: all that the resources allow)",
    )
    parser.add_argument(
        "--cpus-per-trial", type=float, default=1, metavar="C", help="CPUs per trial (default: 1)"
    )
    parser.add_argument(
        "--gpus-per-trial",
        type=float,
        default=0,
        metavar="G",
        help="GPUs per trial, 0..1: a fraction shares one GPU (JAX memory capped at 0.9·G); "
        "give the same value with --resume (default: 0)",
    )
    parser.add_argument(
        "--address",
        help="Ray cluster to use: auto, HOST:PORT or ray://HOST:PORT (default: start a local Ray)",
    )
    parser.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help="experiment storage: folder, shared filesystem or s3://, gs:// URI; every node must "
        f"reach it (default: {DEFAULT_STORAGE})",
    )
    parser.add_argument(
        "--name", help="experiment name, a folder of --storage (default: SPACE-SCHEDULER-DATE)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the experiment --storage/--name: finished trials are kept, unfinished "
        "ones continue from their latest checkpoint, errored ones are not re-run",
    )
    parser.add_argument(
        "--scheduler", choices=("asha", "fifo"), default="asha", help="(default: asha)"
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        metavar="EPOCHS",
        help="ASHA: epochs before a trial can be stopped (default: max(1, epochs // 10))",
    )
    parser.add_argument(
        "--reduction-factor", type=float, default=3, help="ASHA: rung ratio (default: 3)"
    )
    parser.add_argument("--epochs", type=int, help="epochs per trial (default: the space's)")
    parser.add_argument("--dataset", help="dataset of every trial (default: uci_har)")
    parser.add_argument("--data-dir", help="data folder, as experiments.train's --data-dir")
    parser.add_argument(
        "--scan",
        choices=SCANS,
        help="how every trial's layers scan, as experiments.train's --scan (default: auto)",
    )
    parser.add_argument(
        "--remat-chunk-length",
        type=int,
        metavar="N",
        help="with --scan remat: rematerialise every trial's training scans in chunks of N time "
        "steps, as experiments.train's --remat-chunk-length",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the search and of every trial (default: 0)"
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig values the command line sets for every trial (paths made absolute, as
    trials run in other working directories).

    Raises:
        ConfigError: an invalid value (checked here rather than in every trial).
        DataError: with ``--remat-chunk-length``, the dataset (loaded to read its length) is bad.
    """
    overrides: dict[str, Any] = {"seed": args.seed}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.scan is not None:
        overrides["scan"] = args.scan
    if args.remat_chunk_length is not None:
        overrides["remat_chunk_length"] = args.remat_chunk_length
    if args.dataset is not None:
        overrides["dataset"] = absolute_dataset_spec(args.dataset)
    if args.data_dir is not None:
        overrides["data_dir"] = storage_uri(args.data_dir)
    config = TrainConfig.from_dict(overrides)
    if config.remat_chunk_length is not None:  # load the data once here, not in every trial
        check_remat_chunk_length(config.remat_chunk_length, load_config_dataset(config))
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1 (trials); got {args.num_samples}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        parser.error(f"--max-concurrent must be >= 1; got {args.max_concurrent}")
    if not 0 <= args.gpus_per_trial <= 1:
        parser.error("--gpus-per-trial must be in 0..1 (a trial trains on one device)")
    if args.resume and args.name is None:
        parser.error("--resume needs the --name of the experiment (and its --storage)")
    if not args.resume and args.space is None:
        parser.error("--space is required (unless --resume)")
    try:
        if args.resume:
            name = args.name
            tuner = restore_tuner(
                experiment_path(args.storage, name),
                cpus_per_trial=args.cpus_per_trial,
                gpus_per_trial=args.gpus_per_trial,
            )
        else:
            space = get_space(args.space)
            name = args.name or default_name(space, args.scheduler)
            tuner = make_tuner(
                space,
                num_samples=args.num_samples,
                overrides=_overrides(args),
                max_concurrent=args.max_concurrent,
                cpus_per_trial=args.cpus_per_trial,
                gpus_per_trial=args.gpus_per_trial,
                scheduler=args.scheduler,
                grace_period=args.grace_period,
                reduction_factor=args.reduction_factor,
                storage=args.storage,
                name=name,
                seed=args.seed,
            )
    except (ConfigError, DataError, SweepError) as err:
        return cli.report_error(err, cli.USAGE)
    resume = (
        f"python -m experiments.sweep --storage {storage_uri(args.storage)} --name {name} --resume"
        " (with the same --address, --cpus-per-trial and --gpus-per-trial)"
    )
    with ray_connection(args.address, args.gpus_per_trial):
        try:
            tuner.fit()
        except Exception:
            # Tune's driver itself failed (e.g. Ray's out-of-memory monitor killed a trial while
            # it started); the experiment saved so far can be resumed.
            traceback.print_exc()
            return cli.report_error(f"the sweep stopped; resume it with: {resume}", cli.FAILED)
    return summarize(experiment_path(args.storage, name), resume)


if __name__ == "__main__":
    sys.exit(main())
