"""Sweeps: the paper's search spaces, trial configurations, analysis, and real Ray Tune sweeps on
a local two-node Ray cluster (one trial failing on purpose, one sweep killed and resumed)."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import pathlib
import pickle
import subprocess
import sys
import time
import types
import zipfile

import numpy as np
import pytest
import ray
from hyperopt import hp
from hyperopt.pyll import stochastic
from ray.tune.schedulers import TrialScheduler

from experiments import analyze_sweep, sweep
from experiments.config import ConfigError, TrainConfig, load_config_file
from experiments.search_spaces import (
    ROUND_1,
    ROUND_2,
    SearchSpace,
    get_space,
    resolve_point,
    round_to_multiple,
)
from experiments.train import NonFiniteLossError

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: A search space small enough for trials of a few seconds.
TINY_SPACE = SearchSpace(
    name="tiny",
    sampled={
        "learning_rate": hp.loguniform("learning_rate", math.log(0.003), math.log(0.03)),
        "features": hp.uniform("features", 3, 7),
        "num_heads": hp.quniform("num_heads", 1, 2, 1),
    },
    fixed={"window_size": 2, "num_layers": 1, "batch_size": 16, "epochs": 2},
)
#: The same, with a first trial whose learning rate makes the loss NaN at its second step.
FAILING_SPACE = dataclasses.replace(
    TINY_SPACE, initial_points=({"learning_rate": 1e30, "features": 4.0, "num_heads": 2.0},)
)

#: (low, high) of every sampled field, from docs/model.md §5
#: (``c·loguniform(-s, s)`` = c·e^-s .. c·e^s).
PAPER_RANGES = {
    "round1": {
        "learning_rate": (0.005 * math.exp(-0.5), 0.005 * math.exp(0.5)),
        "decay_every": (3, 10),
        "l2": (0.005 * math.exp(-1.3), 0.005 * math.exp(1.3)),
        "dropout_rate": (0.05, 0.5),
        "features": (64 * math.exp(-0.6), 64 * math.exp(0.6)),
        "num_heads": (6, 36),
        "window_size": (10, 50),
    },
    "round2": {
        "learning_rate": (0.006 * math.exp(-0.4), 0.006 * math.exp(0.4)),
        "decay_every": (6, 50),
        "l2": (0.002 * math.exp(-1.3), 0.002 * math.exp(1.3)),
        "dropout_rate": (0.05, 0.5),
        "features": (68 * math.exp(-0.3), 68 * math.exp(0.3)),
        "num_heads": (20, 40),
        "window_size": (25, 100),
    },
}
PAPER_CHOICES = {
    "round1": {
        "mode": {"residual", "layer"},
        "use_positional_encoding": {False, True},
        "activation_on_keys_and_values": {False, True},
        "num_layers": {2, 3},
        "residual_stacking": {False, True},
    },
    "round2": {"mode": {"residual", "layer"}, "use_positional_encoding": {False, True}},
}


def sample(space: SearchSpace, count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [stochastic.sample(space.hyperopt_space(), rng=rng) for _ in range(count)]


def write_dataset(path: pathlib.Path, *, train_rows: int, steps: int = 8) -> pathlib.Path:
    """A small 3-class ``.npz`` task (the class shifts channel 0) with its own validation split."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, rows in (("train", train_rows), ("val", 32), ("test", 32)):
        labels = rng.integers(0, 3, rows)
        x = rng.normal(0.0, 1.0, (rows, steps, 2)).astype(np.float32)
        x[:, :, 0] += labels[:, None]
        arrays[f"X_{split}"], arrays[f"y_{split}"] = x, labels
    np.savez(path, **arrays)
    return path


def write_dataset_with_nan(path: pathlib.Path) -> pathlib.Path:
    """:func:`write_dataset`'s task with a NaN as the first training value: unusable data."""
    write_dataset(path, train_rows=32)
    with np.load(path) as arrays:
        changed = dict(arrays)
    changed["X_train"][0, 0, 0] = np.nan
    np.savez(path, **changed)
    return path


def write_unloadable_dataset(path: pathlib.Path) -> pathlib.Path:
    """An ``.npz`` whose ``X_train`` declares 2**59 float64 values (4 EiB, beyond any address
    space): loading it fails with a MemoryError on every machine, before any data is read."""
    header = io.BytesIO()
    shape = {"descr": "<f8", "fortran_order": False, "shape": (2**59,)}
    np.lib.format.write_array_header_1_0(header, shape)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("X_train.npy", header.getvalue())
    return path


# ------------------------------------------------------------------------------------------------
# Spaces and trial configurations


@pytest.mark.parametrize("space", [ROUND_1, ROUND_2], ids=lambda space: space.name)
def test_spaces_sample_the_ranges_of_the_spec(space: SearchSpace) -> None:
    points = sample(space, 3000)
    ranges, choices = PAPER_RANGES[space.name], PAPER_CHOICES[space.name]
    assert set(space.sampled) == set(ranges) | set(choices)
    for name, (low, high) in ranges.items():
        values = np.array([point[name] for point in points])
        assert values.min() >= low * (1 - 1e-9) and values.max() <= high * (1 + 1e-9), name
        # The whole range is used, not a narrower one.
        assert values.min() - low < 0.02 * (high - low) and high - values.max() < 0.02 * (
            high - low
        ), name
    for name, expected in choices.items():
        assert {point[name] for point in points} == expected, name
    for name in ("decay_every", "num_heads"):
        assert all(float(point[name]).is_integer() for point in points), name


def test_fixed_values_of_each_round() -> None:
    assert ROUND_1.settings() == {"model": "larnn", "epochs": 25, "batch_size": 256}
    assert ROUND_2.settings() == {
        "model": "larnn",
        "epochs": 100,
        "batch_size": 256,
        "num_layers": 3,
        "residual_stacking": True,
        "activation_on_keys_and_values": True,
    }
    assert ROUND_2.settings({"epochs": 4})["epochs"] == 4


@pytest.mark.parametrize("space", [ROUND_1, ROUND_2], ids=lambda space: space.name)
def test_points_resolve_to_valid_configs_with_features_a_multiple_of_num_heads(
    space: SearchSpace,
) -> None:
    for point in sample(space, 500, seed=1):
        config, requested = resolve_point(point)
        assert isinstance(config, TrainConfig)
        assert requested == point["features"]
        assert config.features % config.num_heads == 0
        assert (
            abs(config.features - requested) <= config.num_heads / 2
            or config.features == config.num_heads
        )
        assert config.num_heads == round(point["num_heads"])
        assert config.decay_every == round(point["decay_every"])
        assert config.window_size == int(point["window_size"])
        assert config.epochs == space.fixed["epochs"]


def test_resolve_point_rules() -> None:
    config, requested = resolve_point(
        {
            "features": 75.3,
            "num_heads": 27.0,
            "window_size": 63.9,
            "decay_every": 26.0,
            "learning_rate": 0.01,
        }
    )
    assert (
        config.features,
        requested,
        config.num_heads,
        config.window_size,
        config.decay_every,
    ) == (
        81,
        75.3,
        27,
        63,
        26,
    )
    assert type(config.num_heads) is int and type(config.window_size) is int
    assert round_to_multiple(50.4, 40) == 40  # never below one head's width
    assert round_to_multiple(60.0, 40) == 80  # halves round up
    assert resolve_point({"features": 13, "num_heads": 3}).config.features == 12
    with pytest.raises(ConfigError, match="dropout_rate"):
        resolve_point({"dropout_rate": 1.5})


def test_points_of_older_sweeps_read_renamed_fields_under_their_new_names() -> None:
    """A point of a sweep started when ``remat_chunk_length`` was called ``checkpoint_every``
    (and set, it made the trials rematerialise: there was no ``scan``), and the cell's settings
    had names of their own (``hidden``, ``heads``, ``window``, ...)."""
    old = resolve_point({"checkpoint_every": 16}).config
    assert (old.scan, old.remat_chunk_length) == ("remat", 16)
    config, requested = resolve_point(
        {
            "hidden": 75.3,
            "heads": 27.0,
            "window": 63.9,
            "layers": 2,
            "dropout": 0.2,
            "kv_activation": False,
            "positional_encoding": True,
        }
    )
    assert (requested, config.features, config.num_heads, config.window_size) == (75.3, 81, 27, 63)
    assert (config.num_layers, config.dropout_rate) == (2, 0.2)
    assert not config.activation_on_keys_and_values and config.use_positional_encoding


def test_space_definitions_are_checked() -> None:
    with pytest.raises(ConfigError, match="not TrainConfig fields: hiden"):
        SearchSpace(name="typo", sampled={"hiden": hp.uniform("hiden", 1, 2)})
    with pytest.raises(ConfigError, match="trial budget"):
        SearchSpace(name="budget", sampled={"epochs": hp.uniform("epochs", 1, 2)})
    with pytest.raises(ConfigError, match="exactly the sampled fields"):
        dataclasses.replace(TINY_SPACE, initial_points=({"features": 4.0},))
    with pytest.raises(ConfigError, match="samples features"):
        TINY_SPACE.settings({"features": 8})
    assert get_space("round2") is ROUND_2
    assert get_space(f"{__name__}:TINY_SPACE") is TINY_SPACE
    refused = {
        "round3": "unknown space 'round3': use round1, round2 or MODULE:ATTRIBUTE",
        f"{__name__}:ROOT": f"{__name__}:ROOT is a PosixPath, not a SearchSpace",
        "no_such_module:SPACE": (
            "cannot load space 'no_such_module:SPACE': No module named 'no_such_module'"
        ),
    }
    for name, message in refused.items():
        with pytest.raises(ConfigError) as error:
            get_space(name)
        assert str(error.value) == message


# ------------------------------------------------------------------------------------------------
# Command line and driver pieces


@pytest.mark.parametrize("module", [sweep, analyze_sweep], ids=lambda module: module.__name__)
def test_help(module, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    sweep_flags = """--space --num-samples --max-concurrent --cpus-per-trial --gpus-per-trial
        --address --storage --name --resume --scheduler --epochs --data-dir --dataset --seed
        --grace-period --reduction-factor --scan --remat-chunk-length"""
    flags = sweep_flags.split() if module is sweep else ["DIR", "--out"]
    for flag in flags:
        assert flag in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--space", "round2", "--gpus-per-trial", "2"],
            "--gpus-per-trial must be in 0..1 (a trial trains on one device)",
        ),
        (["--resume"], "--resume needs the --name of the experiment (and its --storage)"),
        (["--num-samples", "3"], "--space is required (unless --resume)"),
        (["--space", "round2", "--num-smaples", "3"], "unrecognized arguments: --num-smaples 3"),
        (["--space", "round2", "--num-samples", "0"], "--num-samples must be >= 1 (trials); got 0"),
        (["--space", "round2", "--max-concurrent", "0"], "--max-concurrent must be >= 1; got 0"),
    ],
    ids=["gpus", "resume-without-name", "no-space", "misspelt-flag", "no-trials", "no-concurrency"],
)
def test_invalid_arguments_exit_2(argv: list[str], message: str, capsys) -> None:
    """argparse's usage, then one line naming the problem, before Ray starts."""
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(argv)
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.splitlines()[-1] == f"python -m experiments.sweep: error: {message}"
    )
    assert not ray.is_initialized()


def test_bad_space_or_missing_experiment_exit_2(tmp_path: pathlib.Path, capsys) -> None:
    refused = {
        ("--space", "round3"): "unknown space 'round3': use round1, round2 or MODULE:ATTRIBUTE",
        ("--resume", "--storage", str(tmp_path), "--name", "absent"): (
            f"no Tune experiment to resume at {tmp_path / 'absent'}"
        ),
        ("--space", "round2", "--epochs", "4", "--grace-period", "5"): (
            "grace period must be in 1..4 (the epochs); got 5"
        ),
        ("--space", "round2", "--remat-chunk-length", "0"): (
            "remat_chunk_length must be >= 1 (or null: off); got 0"
        ),
    }
    for argv, message in refused.items():
        assert sweep.main(list(argv)) == 2
        assert capsys.readouterr().err == f"error: {message}\n"


def test_trial_overrides(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Paths made absolute (trials run elsewhere), run options passed to every trial."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cwd = pathlib.Path.cwd()

    def overrides(*argv: str) -> dict:
        return sweep._overrides(sweep.build_parser().parse_args(["--space", "round2", *argv]))

    toy = tmp_path / "data" / "toy.npz"
    toy.parent.mkdir()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 32, 2)).astype(np.float32), np.arange(10) % 2
    np.savez(toy, X_train=x, y_train=y, X_test=x, y_test=y)
    assert overrides() == {"seed": 0}
    assert overrides(
        *["--dataset", "npz:data/toy.npz", "--data-dir", "data", "--seed", "3"],
        *["--epochs", "5", "--scan", "remat", "--remat-chunk-length", "16"],
    ) == {
        "seed": 3,
        "epochs": 5,
        "scan": "remat",
        "remat_chunk_length": 16,
        "dataset": f"npz:{cwd / 'data' / 'toy.npz'}",
        "data_dir": str(cwd / "data"),
    }
    assert overrides("--dataset", "npz:~/toy.npz")["dataset"] == f"npz:{tmp_path}/home/toy.npz"
    assert overrides("--dataset", "uci_har")["dataset"] == "uci_har"
    # --remat-chunk-length must divide T: checked once, on the data, before any trial starts.
    with pytest.raises(ConfigError, match="12 does not divide the sequence length T = 32 of toy"):
        overrides("--dataset", "npz:data/toy.npz", "--scan", "remat", "--remat-chunk-length", "12")
    with pytest.raises(ConfigError, match="add --scan remat"):
        overrides("--remat-chunk-length", "16")
    assert overrides("--scan", "plain") == {"seed": 0, "scan": "plain"}
    argv = ["--space", "round2", "--dataset", "npz:data/absent.npz", "--scan", "remat"]
    argv += ["--remat-chunk-length", "8"]
    assert sweep.main(argv) == 2
    assert "absent.npz" in capsys.readouterr().err


def test_device_environment_of_trials() -> None:
    assert sweep.device_env(0) == {"JAX_PLATFORMS": "cpu"}
    assert sweep.device_env(0.25) == {
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.225",
    }
    assert sweep.device_env(1) == {}


def test_asha_stops_a_trial_outside_the_top_third_of_its_rung() -> None:
    """The rule of the module docstring, on the scheduler the sweep builds: 20 epochs, grace
    period 2 (the default, epochs // 10) and reduction factor 3 give rungs at epochs 2 and 6;
    reaching one, a trial goes on only if its validation accuracy is at least the 2/3 quantile
    of those that reached it before (the first to arrive always goes on)."""
    scheduler = sweep.make_scheduler("asha", epochs=20)
    scheduler.set_search_properties(sweep.METRIC, sweep.MODE)
    trials = {name: types.SimpleNamespace(trial_id=name) for name in "abcd"}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)

    def decide(name: str, epoch: int, val_accuracy: float) -> str:
        result = {"training_iteration": epoch, sweep.METRIC: val_accuracy}
        return scheduler.on_trial_result(None, trials[name], result)

    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert decide("b", 1, 0.1) == go  # before the grace period, whatever the accuracy
    assert decide("a", 2, 0.5) == go  # first at rung 2
    assert decide("b", 2, 0.4) == stop  # below 0.5
    assert decide("c", 2, 0.6) == go  # quantile of 0.5, 0.4: 0.467
    assert decide("d", 2, 0.5) == stop  # quantile of 0.5, 0.4, 0.6: 0.533
    assert decide("a", 3, 0.1) == go  # between rungs
    assert decide("a", 6, 0.7) == go  # first at rung 6
    assert decide("c", 6, 0.65) == stop
    assert decide("a", 20, 0.9) == stop  # the budget: the last epoch


def test_training_errors_survive_copy_and_pickle() -> None:
    error = NonFiniteLossError("loss is nan", epoch=2, step=3, value=math.nan)
    for clone in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert str(clone) == "loss is nan" and (clone.epoch, clone.step) == (2, 3)


# ------------------------------------------------------------------------------------------------
# Analysis, from trial records


def record(
    trial_id: str, status: str, val: list[float], **point: object
) -> analyze_sweep.TrialRecord:
    history = [
        {"epoch": epoch, "val_accuracy": v, "test_accuracy": v - 0.1, "node_id": "n1"}
        for epoch, v in enumerate(val, start=1)
    ]
    return analyze_sweep.TrialRecord(
        trial_id=trial_id,
        tune_status=status,
        error="NonFiniteLossError: loss is nan" if status == "ERROR" else "",
        point={**TINY_SPACE.settings({"epochs": 3}), "num_heads": 2.0, **point},
        history=history,
    )


def test_trial_table_best_config_and_figures(tmp_path: pathlib.Path, monkeypatch) -> None:
    records = [
        record("a", "TERMINATED", [0.5, 0.7, 0.6], features=5.2, learning_rate=0.01),
        record("b", "TERMINATED", [0.4], features=3.1, learning_rate=0.02),  # stopped by ASHA
        record("c", "ERROR", [], features=6.9, learning_rate=1e30),
        record("d", "TERMINATED", [0.7, 0.8, 0.8], features=4.0, learning_rate=0.005),
    ]
    table = analyze_sweep.trial_table(records)
    assert list(table["trial_id"]) == ["d", "a", "b", "c"]
    assert list(table["status"]) == ["finished", "finished", "stopped early", "error"]
    assert list(table["epochs_run"]) == [3, 3, 1, 0]
    # The latest of equal validation accuracies, and the test accuracy of that epoch.
    assert table["best_epoch"][0] == 3 and table["test_accuracy"][0] == pytest.approx(0.7)
    assert table["best_epoch"][1] == 2 and table["test_accuracy"][1] == pytest.approx(0.6)
    assert list(table["features"]) == [4, 6, 4, 6] and table["features_requested"][0] == 4.0
    assert table["error"][3] == "NonFiniteLossError: loss is nan"
    assert table.attrs["varying"] == ["features_requested", "features", "learning_rate"]

    best = analyze_sweep.best_config(table, records)
    path = tmp_path / "best.json"
    path.write_text(json.dumps(best))
    config = TrainConfig.from_dict(load_config_file(path))
    assert (config.features, config.learning_rate, config.epochs) == (4, 0.005, 3)

    monkeypatch.setattr(analyze_sweep, "load_experiment", lambda _: records)
    assert analyze_sweep.main(["experiment", "--out", str(tmp_path / "out")]) == 0
    for name in ("trials.csv", "trials.md", "best_config.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    for name in ("val_accuracy_per_epoch.png", "hyperparameters_scatter.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(b"\x89PNG")
    markdown = (tmp_path / "out" / "trials.md").read_text()
    assert "| d | finished | 3 |" in markdown and "NonFiniteLossError" in markdown


def test_summary_lists_errors_and_how_to_resume(monkeypatch, capsys) -> None:
    records = [
        record("a", "TERMINATED", [0.5, 0.6, 0.7]),
        record("c", "ERROR", []),
        record("p", "PENDING", [0.4]),
    ]
    monkeypatch.setattr(analyze_sweep, "load_experiment", lambda _: records)
    assert sweep.summarize("EXPERIMENT", "RESUME") == 0
    out = capsys.readouterr().out
    assert "trial c failed: NonFiniteLossError: loss is nan" in out
    assert out.count("3 trials: ") == 1
    for part in ("1 finished", "1 error", "1 pending"):
        assert part in out
    assert "unfinished trials: resume with RESUME" in out
    assert "results: EXPERIMENT" in out
    monkeypatch.setattr(analyze_sweep, "load_experiment", lambda _: records[1:2])
    assert sweep.summarize("EXPERIMENT", "RESUME") == 1  # every trial failed


def test_describe_error() -> None:
    assert analyze_sweep.describe_error(None) == ""
    assert analyze_sweep.describe_error(ValueError("bad")) == "ValueError: bad"
    assert analyze_sweep.describe_error("Traceback ...\n  File x\nValueError: bad\n") == (
        "ValueError: bad"
    )


class CodeThatRuns:
    """Unpickled, it creates the file ``path``: what a crafted sweep folder could do."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (str(self.path), "w")


def tune_experiment_folder(folder: pathlib.Path, trap: bytes) -> None:
    """A Tune experiment folder as Ray 2 writes it (experiment_state JSON with pickles embedded
    as hexadecimal text, and a folder per trial with result.json, error.txt, params.pkl,
    error.pkl), every pickle in it being ``trap``: a trial that finished 3 epochs, one that
    failed."""
    pickled = {"_type": "CLOUDPICKLE_FALLBACK", "value": trap.hex()}
    trials = {
        "f_00000": ("TERMINATED", [0.5, 0.7, 0.6], None),
        "f_00001": ("ERROR", [], "experiments.data.dataset.DataError: toy.npz: bad data"),
    }
    trial_data = []
    for trial_id, (status, val, error) in trials.items():
        point = {**TINY_SPACE.settings({"epochs": 3}), "num_heads": 2.0, "features": 4.0}
        state = {"trial_id": trial_id, "status": status, "config": point, "storage": pickled}
        state |= {"relative_logdir": f"trial_{trial_id}", "results": trap.hex()}
        metadata = {
            "error_filename": None,
            "last_result_time": -math.inf,
            "checkpoint_manager": pickled,
        }
        trial_folder = folder / f"trial_{trial_id}"
        trial_folder.mkdir(parents=True)
        (trial_folder / "params.json").write_text(json.dumps(point))
        (trial_folder / "params.pkl").write_bytes(trap)
        reports = [
            {"epoch": epoch, "val_accuracy": v, "test_accuracy": v - 0.1, "config": point}
            for epoch, v in enumerate(val, start=1)
        ]
        (trial_folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in reports))
        if error is not None:
            (trial_folder / "error.txt").write_text(f"Failure # 1\nTraceback\n  File x\n{error}\n")
            (trial_folder / "error.pkl").write_bytes(trap)
            metadata |= {"error_filename": "error.txt", "pickled_error_filename": "error.pkl"}
        trial_data.append([json.dumps(state), json.dumps(metadata)])
    for name in (
        "experiment_state-2025-01-01_00-00-00.json",
        "experiment_state-2025-01-02_00-00-00.json",
    ):
        (folder / name).write_text(json.dumps({"trial_data": trial_data, "runner_data": pickled}))
    (folder / "tuner.pkl").write_bytes(trap)


def test_analysis_reads_a_sweep_folder_without_unpickling_anything(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sweep folder is read from its JSON and text files: a crafted one (every pickle in it
    creates a file when loaded, as Tune's own reader shows) runs no code."""
    ran = tmp_path / "code-ran"
    experiment = tmp_path / "sweeps" / "crafted"
    tune_experiment_folder(experiment, pickle.dumps(CodeThatRuns(ran)))

    records = analyze_sweep.load_experiment(str(experiment))
    assert [(r.trial_id, r.tune_status, r.error) for r in records] == [
        ("f_00000", "TERMINATED", ""),
        ("f_00001", "ERROR", "DataError: toy.npz: bad data"),
    ]
    assert [line["val_accuracy"] for line in records[0].history] == [0.5, 0.7, 0.6]
    out = tmp_path / "analysis"
    assert analyze_sweep.main([str(experiment), "--out", str(out)]) == 0
    assert "| f_00000 | finished | 3 |" in (out / "trials.md").read_text()
    assert sweep.summarize(str(experiment), "RESUME") == 0
    assert "trial f_00001 failed: DataError: toy.npz: bad data" in capsys.readouterr().out
    assert not ran.exists()

    from ray.tune import ExperimentAnalysis  # Tune's reader unpickles what the folder holds

    with pytest.raises(Exception):  # noqa: B017 (the trap's file object is no trial storage)
        ExperimentAnalysis(str(experiment))
    assert ran.exists()


def test_analysis_of_a_folder_without_an_experiment(tmp_path: pathlib.Path, capsys) -> None:
    assert analyze_sweep.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (
        f"error: no Tune experiment at {tmp_path}: it holds no experiment_state-*.json\n"
    )


# ------------------------------------------------------------------------------------------------
# A real sweep on a local Ray, small enough for every test run


def result_files(experiment: pathlib.Path) -> dict[str, bytes]:
    """Every trial's ``result.json`` (Tune appends a line per report), by trial folder."""
    return {path.parent.name: path.read_bytes() for path in experiment.glob("*/result.json")}


@pytest.mark.slow
def test_reduced_sweep_records_every_failure_and_resume_runs_nothing_again(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three 2-epoch trials: data with a NaN, data too large for memory, and one that finishes
    (a NaN loss fails a trial in the slow tests). Failed trials are recorded with their error and
    the sweep goes on; --resume keeps every trial as it was (failed ones are not tried again,
    finished ones not re-run)."""
    good, nan, huge = (
        f"npz:{write(tmp_path / name)}"
        for write, name in (
            (lambda path: write_dataset(path, train_rows=32), "toy.npz"),
            (write_dataset_with_nan, "nan.npz"),
            (write_unloadable_dataset, "huge.npz"),
        )
    )
    point = {"learning_rate": 0.01, "features": 4.0, "num_heads": 2.0}
    space = dataclasses.replace(
        TINY_SPACE,
        name="reduced",
        sampled={**TINY_SPACE.sampled, "dataset": hp.choice("dataset", [good, nan, huge])},
        initial_points=(
            {**point, "dataset": nan},
            {**point, "dataset": huge},
            {**point, "dataset": good},
        ),
    )
    monkeypatch.setattr(sys.modules[__name__], "REDUCED_SPACE", space, raising=False)
    experiment = tmp_path / "sweeps" / "reduced"
    where = ["--storage", str(tmp_path / "sweeps"), "--name", "reduced"]
    space_name = f"{__name__}:REDUCED_SPACE"
    argv = [*where, "--space", space_name, "--num-samples", "3", "--scheduler", "fifo"]
    assert sweep.main(argv) == 0
    output = capsys.readouterr().out

    records = analyze_sweep.load_experiment(str(experiment))
    outcomes = {
        (record.point["learning_rate"], record.point["dataset"]): (
            record.tune_status,
            [line["epoch"] for line in record.history],
            record.error,
        )
        for record in records
    }
    assert outcomes == {
        (0.01, nan): (
            "ERROR",
            [],
            f"DataError: {nan.removeprefix('npz:')}: X_train[0, 0, 0] = nan is not a finite "
            "float32",
        ),
        (0.01, huge): (
            "ERROR",
            [],
            # The class the trial raised, numpy's MemoryError (the last line of error.txt).
            "_ArrayMemoryError: Unable to allocate 4.00 EiB for an array with shape "
            "(576460752303423488,) and data type float64",
        ),
        (0.01, good): ("TERMINATED", [1, 2], ""),
    }
    for record in records:
        if record.error:
            assert f"trial {record.trial_id} failed: {record.error}\n" in output
    assert "3 trials: 2 error, 1 finished\n" in output
    results = result_files(experiment)
    assert len(results) == 3

    assert sweep.main([*where, "--resume"]) == 0
    assert "3 trials: 2 error, 1 finished\n" in capsys.readouterr().out
    assert result_files(experiment) == results  # no trial reported anything again
    resumed = analyze_sweep.load_experiment(str(experiment))
    assert {r.trial_id: (r.tune_status, r.error) for r in resumed} == {
        r.trial_id: (r.tune_status, r.error) for r in records
    }


# ------------------------------------------------------------------------------------------------
# Real sweeps on a local two-node Ray cluster


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of two nodes with one CPU and one (declared) GPU each; shut down after
    the module's tests, failed or not."""
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "num_gpus": 1, "object_store_memory": 100 * 1024**2}
    ray_cluster = Cluster(initialize_head=True, head_node_args=node)
    try:
        ray_cluster.add_node(**node)
        ray_cluster.wait_for_nodes()
        yield ray_cluster
    finally:
        ray_cluster.shutdown()


def node_ids(ray_cluster) -> set[str]:
    return {node.node_id for node in [ray_cluster.head_node, *ray_cluster.worker_nodes]}


@pytest.mark.slow
def test_sweep_on_two_nodes_with_a_failing_trial(cluster, tmp_path: pathlib.Path, capsys) -> None:
    data = write_dataset(tmp_path / "toy.npz", train_rows=64)
    status = sweep.main(
        [
            "--space",
            f"{__name__}:FAILING_SPACE",
            "--num-samples",
            "4",
            "--address",
            cluster.address,
            "--cpus-per-trial",
            "1",
            "--gpus-per-trial",
            "0.5",  # two trials could share each GPU: checks the workers' XLA settings
            "--storage",
            str(tmp_path / "sweeps"),
            "--name",
            "two-nodes",
            "--dataset",
            f"npz:{data}",
        ]
    )
    output = capsys.readouterr().out
    assert status == 0
    experiment = tmp_path / "sweeps" / "two-nodes"
    assert f"results: {experiment}" in output
    table = analyze_sweep.trial_table(analyze_sweep.load_experiment(str(experiment)))
    succeeded = table[table["status"].isin(analyze_sweep.SUCCEEDED)]
    assert len(succeeded) == 3 and (table["status"] == "error").sum() == 1
    failed = table[table["status"] == "error"].iloc[0]
    assert failed["learning_rate"] == 1e30 and failed["epochs_run"] == 0
    assert failed["error"].startswith("NonFiniteLossError: the training loss is nan")
    assert f"trial {failed['trial_id']} failed: NonFiniteLossError" in output
    assert "1 error" in output
    # ASHA (grace period 1 of 2 epochs) may stop trials after their first epoch.
    assert set(succeeded["epochs_run"]) <= {1, 2}
    assert (succeeded["epochs_run"] == 2).any()
    assert (succeeded["features"] % succeeded["num_heads"] == 0).all()
    assert succeeded["features_requested"].between(3, 7).all()
    used = {node for nodes in succeeded["nodes"] for node in nodes.split(",")}
    assert used == node_ids(cluster)

    out = tmp_path / "analysis"
    assert analyze_sweep.main([str(experiment), "--out", str(out)]) == 0
    csv = out / "trials.csv"
    assert len(csv.read_text().splitlines()) == 5
    assert "NonFiniteLossError" in (out / "trials.md").read_text()
    best = TrainConfig.from_dict(load_config_file(out / "best_config.json"))
    assert best.features == table["features"].iloc[0] and best.epochs == 2
    for name in ("val_accuracy_per_epoch.png", "hyperparameters_scatter.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def wait_for(condition, timeout: float, what: str) -> None:
    """Checks ``condition`` every half second until it holds; ``timeout`` only keeps a broken
    run from hanging (the condition, once reached, stays: nothing here races)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


def trial_files(experiment: pathlib.Path, trial_id: str) -> dict[str, bytes]:
    """Every file of a trial's folder in the experiment's storage (results, error, parameters),
    by path inside it, without its checkpoints."""
    folder = experiment / f"trial_{trial_id}"
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.relative_to(folder).as_posix().startswith("checkpoint_")
    }


def saved_trials(experiment: pathlib.Path) -> dict[float, analyze_sweep.TrialRecord]:
    """The trials as the experiment's saved state has them, by learning rate ({} before the
    first save)."""
    try:
        records = analyze_sweep.load_experiment(str(experiment))
    except (ValueError, FileNotFoundError):
        return {}
    return {record.point["learning_rate"]: record for record in records}


def raw_results(experiment: pathlib.Path, trial_id: str) -> list[dict]:
    lines = (experiment / f"trial_{trial_id}" / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines]


#: The killed sweep's first three trials, in order (one at a time): the first fails, the second
#: finishes, the third is held after its second epoch while the driver is killed.
FAILING_RATE, FINISHING_RATE, HELD_RATE = 1e30, 0.01, 0.02
KILLED_SPACE = dataclasses.replace(
    TINY_SPACE,
    initial_points=tuple(
        {"learning_rate": rate, "features": 4.0, "num_heads": 2.0}
        for rate in (FAILING_RATE, FINISHING_RATE, HELD_RATE)
    ),
)
SWEEP_PROCESS = pathlib.Path(__file__).with_name("sweep_process.py")


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_or_failed_trials(
    cluster, tmp_path: pathlib.Path
) -> None:
    data = write_dataset(tmp_path / "toy.npz", train_rows=64)
    storage, name = tmp_path / "sweeps", "killed"
    experiment = storage / name
    common = ["--address", cluster.address, "--storage", str(storage), "--name", name]
    path = os.pathsep.join([str(pathlib.Path(__file__).parent), str(ROOT)])
    env = {**os.environ, "PYTHONPATH": path}
    command = [sys.executable, str(SWEEP_PROCESS)]
    log = tmp_path / "first-driver.log"
    with log.open("w") as sink:
        first = subprocess.Popen(
            [
                *command,
                *["--hold", f"{HELD_RATE}:2", "--"],
                *common,
                *["--space", f"{pathlib.Path(__file__).stem}:KILLED_SPACE", "--num-samples", "4"],
                *["--epochs", "4", "--max-concurrent", "1", "--scheduler", "fifo"],
                *["--dataset", f"npz:{data}"],
            ],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            # The held trial cannot go past epoch 2: this state comes and stays until the kill.
            def failed_finished_and_held() -> bool:
                assert first.poll() is None, log.read_text()[-5000:]
                trials = saved_trials(experiment)
                return (
                    set(trials) == {FAILING_RATE, FINISHING_RATE, HELD_RATE}
                    and trials[FAILING_RATE].tune_status == "ERROR"
                    and trials[FINISHING_RATE].tune_status == "TERMINATED"
                    and len(trials[HELD_RATE].history) == 2
                )

            wait_for(failed_finished_and_held, 600, "a failed, a finished and a held trial")
        finally:
            first.kill()
            first.wait(timeout=60)
    first_log = log.read_text()
    before = saved_trials(experiment)
    failed, done, held = (before[rate] for rate in (FAILING_RATE, FINISHING_RATE, HELD_RATE))
    assert failed.error.startswith("NonFiniteLossError: the training loss is nan"), first_log
    assert len(done.history) == 4, first_log
    kept = {trial.trial_id: trial_files(experiment, trial.trial_id) for trial in (failed, done)}

    resumed = subprocess.run(
        [*command, "--", *common, "--resume"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, first_log[-3000:] + output[-5000:]
    assert "4 trials: 3 finished, 1 error\n" in resumed.stdout, output[-5000:]
    assert f"trial {failed.trial_id} failed: {failed.error}\n" in resumed.stdout

    after = saved_trials(experiment)
    assert len(after) == 4
    assert (after[FAILING_RATE].tune_status, after[FAILING_RATE].error) == ("ERROR", failed.error)
    # Neither the failed nor the finished trial ran again: their folders are as they were.
    for trial_id, files in kept.items():
        assert trial_files(experiment, trial_id) == files
    finished = [trial for rate, trial in after.items() if rate != FAILING_RATE]
    for trial in finished:
        assert trial.tune_status == "TERMINATED" and len(trial.history) == 4
        results = raw_results(experiment, trial.trial_id)
        # Every epoch reported once, in order: the held trial continued from its checkpoint.
        assert [r["epoch"] for r in results] == [1, 2, 3, 4]
        assert [r["training_iteration"] for r in results] == [1, 2, 3, 4]
    pids = [r["pid"] for r in raw_results(experiment, held.trial_id)]
    assert pids[0] == pids[1] != pids[2] == pids[3], "the held trial went on in a new process"
