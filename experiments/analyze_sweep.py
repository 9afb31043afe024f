"""Tables, best configuration and figures of a sweep made by :mod:`experiments.sweep`.

    python -m experiments.analyze_sweep runs/sweeps/round2-asha-20250101-120000
    python -m experiments.analyze_sweep s3://bucket/sweeps/r2 --out analysis/r2

Writes to ``OUT`` (default ``DIR/analysis``; required when DIR is a URI):

    trials.csv                   every trial, best validation accuracy first: status, error, epochs
                                 run (epochs_run), best validation accuracy, its epoch, the test accuracy of that
                                 epoch, the Ray nodes that ran it, and its whole configuration
    trials.md                    the same table in Markdown, with the hyperparameters that vary
    best_config.json             the best trial's configuration, for
                                 ``python -m experiments.train --config best_config.json``
    val_accuracy_per_epoch.png   validation accuracy per epoch of every trial (paper Fig. 6/7)
    hyperparameters_scatter.png  scatter matrix of the varying hyperparameters and the best
                                 validation accuracy, coloured by the latter (paper Fig. 8/9)

Epochs are selected as in a single run (:func:`experiments.report.select_epoch`): the highest
validation accuracy, the latest of equal ones; its test accuracy is the honest figure.
A trial's status is ``finished`` (all its epochs), ``stopped early`` (by ASHA), ``error``, or
Tune's own status while unfinished (``pending``, ``running``, ``paused``).

The sweep folder is read from its JSON and text files only (:func:`load_experiment`): the pickles
it also holds are never loaded, so analysing a folder from elsewhere runs none of its code.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from pyarrow import fs

from experiments import cli
from experiments.report import select_epoch
from experiments.search_spaces import resolve_point

#: The columns of a short summary of each trial.
SUMMARY_COLUMNS = (
    "trial_id",
    "status",
    "epochs_run",
    "best_val_accuracy",
    "best_epoch",
    "test_accuracy",
)
#: TrainConfig fields that say where a run goes, not what it is: left out of tables and configs.
RUN_LOCATION_FIELDS = ("out", "progress")
SUCCEEDED = ("finished", "stopped early")
TABLE_CSV, TABLE_MD, BEST_CONFIG = "trials.csv", "trials.md", "best_config.json"
CURVES_PNG, SCATTER_PNG = "val_accuracy_per_epoch.png", "hyperparameters_scatter.png"


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """What a sweep holds about one trial.

    Attributes:
        trial_id: Tune's trial id.
        tune_status: Tune's status (TERMINATED, ERROR, PENDING, RUNNING, PAUSED).
        error: one line describing the trial's error ("" without one).
        point: the point of the search space (Tune's ``config`` of the trial).
        history: the reported metrics of each epoch, in order (one row per epoch).
    """

    trial_id: str
    tune_status: str
    error: str
    point: dict[str, Any]
    history: list[dict[str, Any]]


def describe_error(error: BaseException | str | None) -> str:
    """One line for a trial's error: ``Type: message`` of the exception the trial raised (Ray
    wraps it, as the ``cause`` of a RayTaskError), or the last line of a text traceback (Tune's
    ``error.txt``), its type without its module (``DataError: ...`` for
    ``experiments.data.dataset.DataError: ...``)."""
    if error is None:
        return ""
    if isinstance(error, BaseException):
        cause = getattr(error, "cause", None) or error
        return f"{type(cause).__name__}: {cause}".strip()
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return re.sub(r"^(?:\w+\.)+(\w+:)", r"\1", lines[-1]) if lines else "unknown error"


#: Tune's record of an experiment, rewritten as it runs: the newest one is read.
EXPERIMENT_STATE = "experiment_state-*.json"


def load_experiment(path: str) -> list[TrialRecord]:
    """Every trial of the Tune experiment at ``path`` (folder or URI), read from its JSON and
    text files only: Tune's newest ``experiment_state-*.json`` (each trial's status, point,
    folder and error file) and each trial's ``result.json`` (its reports) and ``error.txt``.

    Nothing is unpickled: Tune's own reader (``ray.tune.ExperimentAnalysis``) loads the pickles
    that a sweep folder also holds (embedded in that JSON, ``params.pkl``, ``error.pkl``), which
    run code when loaded; here a crafted folder can at most give wrong figures. (Resuming a
    sweep, ``experiments.sweep --resume``, does load them: resume only sweeps you trust.)

    Raises:
        ValueError: ``path`` holds no Tune experiment, or a file of it is not what Tune writes.
    """
    filesystem, root = _filesystem(path)
    try:
        names = [info.base_name for info in filesystem.get_file_info(fs.FileSelector(root))]
    except (OSError, ValueError) as err:
        raise ValueError(f"no Tune experiment at {path}: {err}") from err
    states = sorted(fnmatch.filter(names, EXPERIMENT_STATE))
    if not states:
        raise ValueError(f"no Tune experiment at {path}: it holds no {EXPERIMENT_STATE}")
    try:
        trial_data = json.loads(_read(filesystem, f"{root}/{states[-1]}"))["trial_data"]
        records = [_trial_record(filesystem, root, *entry) for entry in trial_data]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an experiment folder that Tune wrote ({err!r})") from err
    return records


def _filesystem(path: str) -> tuple[fs.FileSystem, str]:
    """The (pyarrow) file system of ``path`` (a folder or a URI such as ``s3://bucket/sweep``),
    and the path within it."""
    if "://" not in path:
        path = str(pathlib.Path(path).absolute())
    filesystem, root = fs.FileSystem.from_uri(path)
    return filesystem, root.rstrip("/")


def _read(filesystem: fs.FileSystem, path: str) -> str:
    with filesystem.open_input_stream(path) as stream:
        return stream.readall().decode("utf-8")


def _trial_record(
    filesystem: fs.FileSystem, root: str, trial_json: str, metadata_json: str
) -> TrialRecord:
    """A trial from its entry in the experiment state (two JSON documents, read as plain JSON:
    the pickles embedded in them stay hexadecimal text) and its folder's files."""
    trial, metadata = json.loads(trial_json), json.loads(metadata_json)
    folder = f"{root}/{trial['relative_logdir']}"
    rows = []
    if filesystem.get_file_info(f"{folder}/result.json").type == fs.FileType.File:
        rows = [
            json.loads(line) for line in _read(filesystem, f"{folder}/result.json").splitlines()
        ]
    # A restored trial may have re-reported an epoch: keep the latest report of each.
    by_epoch = {int(row["epoch"]): row for row in rows if "epoch" in row}
    error = None
    if trial["status"] == "ERROR" and metadata.get("error_filename"):
        error = _read(filesystem, f"{folder}/{metadata['error_filename']}")
    return TrialRecord(
        trial_id=trial["trial_id"],
        tune_status=trial["status"],
        error=describe_error(error),
        point=dict(trial["config"]),
        history=[by_epoch[epoch] for epoch in sorted(by_epoch)],
    )


def _status(record: TrialRecord, epochs: int) -> str:
    if record.tune_status == "ERROR":
        return "error"
    if record.tune_status != "TERMINATED":
        return record.tune_status.lower()
    return "finished" if len(record.history) >= epochs else "stopped early"


def _config_values(record: TrialRecord) -> dict[str, Any]:
    """The trial's resolved configuration (without run location) and requested hidden size."""
    resolved = resolve_point(record.point)
    values = resolved.config.to_dict()
    for name in RUN_LOCATION_FIELDS:
        values.pop(name)
    return {"features_requested": resolved.features_requested, **values}


def trial_table(records: Sequence[TrialRecord]) -> pd.DataFrame:
    """One row per trial, sorted by best validation accuracy (trials without results last).

    Columns: :data:`SUMMARY_COLUMNS`, ``error``, ``nodes`` (the Ray node ids that ran it, comma
    separated) and every configuration field (``features_requested`` included). The names of the
    hyperparameters that vary across trials are in ``table.attrs["varying"]``.
    """
    rows = []
    for record in records:
        config = _config_values(record)
        history = record.history
        best = select_epoch(history) if history else None
        best_row = next((row for row in history if row["epoch"] == best), {})
        nodes = dict.fromkeys(str(row["node_id"]) for row in history if "node_id" in row)
        rows.append(
            {
                "trial_id": record.trial_id,
                "status": _status(record, config["epochs"]),
                "epochs_run": len(history),
                "best_val_accuracy": best_row.get("val_accuracy", math.nan),
                "best_epoch": best,
                "test_accuracy": best_row.get("test_accuracy", math.nan),
                "error": record.error,
                "nodes": ",".join(nodes),
                **config,
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["best_epoch"] = table["best_epoch"].astype("Int64")  # an integer, or <NA>
    table = table.sort_values(
        "best_val_accuracy", ascending=False, na_position="last", kind="stable"
    ).reset_index(drop=True)
    config_columns = list(table.columns[table.columns.get_loc("nodes") + 1 :])
    table.attrs["varying"] = [
        name for name in config_columns if table[name].astype(str).nunique() > 1
    ]
    return table


def _cell(value: Any) -> str:
    if pd.isna(value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(table: pd.DataFrame) -> str:
    """``table`` as a Markdown table (floats with 4 significant digits, missing values empty)."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |"]
    lines.append("|" + "---|" * len(table.columns))
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines) + "\n"


def best_config(table: pd.DataFrame, records: Sequence[TrialRecord]) -> dict[str, Any]:
    """The TrainConfig fields of the trial with the best validation accuracy.

    Raises:
        ValueError: no trial reported a validation accuracy.
    """
    if table.empty or table["best_val_accuracy"].isna().all():
        raise ValueError("no trial has a validation accuracy")
    best_id = table["trial_id"].iloc[0]
    record = next(record for record in records if record.trial_id == best_id)
    config = _config_values(record)
    config.pop("features_requested")
    return config


def _plot_curves(table: pd.DataFrame, records: Sequence[TrialRecord], path: pathlib.Path) -> None:
    """Validation accuracy per epoch of every trial, the best one highlighted."""
    figure = Figure(figsize=(8, 5), layout="constrained")
    ax = figure.add_subplot()
    best_id = table["trial_id"].iloc[0]
    reported = [record for record in records if record.history]
    for record in reported:
        epochs = [row["epoch"] for row in record.history]
        values = [row["val_accuracy"] for row in record.history]
        if record.trial_id == best_id:
            ax.plot(epochs, values, "o-", color="black", lw=2.5, ms=4, label=f"best: {best_id}")
        else:
            ax.plot(epochs, values, "o-", lw=1, ms=3, alpha=0.7)
    ax.set(
        xlabel="epoch",
        ylabel="validation accuracy",
        title=f"Validation accuracy per epoch, {len(reported)} trials with results",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if reported:
        ax.legend(loc="lower right")
    figure.savefig(path, dpi=120)


def _numeric(column: pd.Series) -> tuple[np.ndarray, list[str] | None]:
    """A column as numbers, with the category labels when it is not numeric (codes 0, 1, ...)."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        return column.to_numpy(float), None
    labels = sorted(column.astype(str).unique())
    return column.astype(str).map(labels.index).to_numpy(float), labels


def _plot_scatter_matrix(table: pd.DataFrame, path: pathlib.Path) -> None:
    """Pairwise scatter plots of the varying hyperparameters and the best validation accuracy,
    each point a trial coloured by its best validation accuracy; histograms on the diagonal."""
    done = table[table["best_val_accuracy"].notna()]
    names = [*table.attrs.get("varying", []), "best_val_accuracy"]
    columns = {name: _numeric(done[name]) for name in names}
    size = len(names)
    figure = Figure(figsize=(2.2 * size + 1.5, 2.2 * size), layout="constrained")
    axes = figure.subplots(size, size, squeeze=False)
    colour = done["best_val_accuracy"].to_numpy(float)
    points = None
    for i, y_name in enumerate(names):
        for j, x_name in enumerate(names):
            ax = axes[i][j]
            x, x_labels = columns[x_name]
            if i == j:
                ax.hist(x, bins=min(10, max(1, len(x))), color="tab:gray")
            else:
                y, y_labels = columns[y_name]
                points = ax.scatter(x, y, c=colour, cmap="viridis", s=18)
                if y_labels is not None:
                    ax.set_yticks(range(len(y_labels)), y_labels)
            if x_labels is not None:
                ax.set_xticks(range(len(x_labels)), x_labels)
            if i == size - 1:
                ax.set_xlabel(x_name)
            if j == 0:
                ax.set_ylabel(y_name)
            ax.tick_params(labelsize=7)
    if points is not None:
        figure.colorbar(points, ax=axes, label="best validation accuracy", shrink=0.6)
    figure.suptitle(f"Hyperparameters and best validation accuracy, {len(done)} trials")
    figure.savefig(path, dpi=100)


def analyze(path: str, out: pathlib.Path) -> tuple[pd.DataFrame, dict[str, pathlib.Path]]:
    """Writes the tables, the best configuration (when a trial has a validation accuracy) and
    the figures of the sweep at ``path`` into ``out``.

    Returns:
        The trial table (:func:`trial_table`) and the files written, by file name.

    Raises:
        ValueError: ``path`` holds no experiment, or one without trials.
    """
    records = load_experiment(path)
    table = trial_table(records)
    if table.empty:
        raise ValueError(f"the experiment at {path} has no trials")
    out.mkdir(parents=True, exist_ok=True)
    written = {name: out / name for name in (TABLE_CSV, TABLE_MD, CURVES_PNG)}
    table.to_csv(written[TABLE_CSV], index=False)
    summary = table[[*SUMMARY_COLUMNS, *table.attrs["varying"], "error"]]
    written[TABLE_MD].write_text(markdown(summary))
    _plot_curves(table, records, written[CURVES_PNG])
    if table["best_val_accuracy"].notna().any():
        written[BEST_CONFIG] = out / BEST_CONFIG
        written[BEST_CONFIG].write_text(json.dumps(best_config(table, records), indent=2) + "\n")
        written[SCATTER_PNG] = out / SCATTER_PNG
        _plot_scatter_matrix(table, written[SCATTER_PNG])
    return table, written


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = cli.command_parser("experiments.analyze_sweep", __doc__)
    parser.add_argument("experiment", metavar="DIR", help="the sweep's folder (or URI)")
    parser.add_argument("--out", metavar="OUTDIR", help="output folder (default: DIR/analysis)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 done, 1 no usable trial, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and "://" in args.experiment:
        parser.error("--out is required when the experiment is a URI")
    out = pathlib.Path(args.out or pathlib.Path(args.experiment, "analysis"))
    try:
        table, written = analyze(args.experiment, out)
    except ValueError as err:
        return cli.report_error(err, cli.FAILED)
    print(markdown(table[list(SUMMARY_COLUMNS)]))
    for path in written.values():
        print(f"wrote {path}")
    return cli.OK if BEST_CONFIG in written else cli.FAILED


if __name__ == "__main__":
    sys.exit(main())
