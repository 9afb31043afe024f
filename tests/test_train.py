"""Training entry point: learning, outputs, command line, optimiser, NaN stop, crash and resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from training_process import run_training

from experiments import evaluate, report, steps
from experiments import train as train_module
from experiments.checkpoints import CheckpointStore, verify_step
from experiments.config import RENAMED_FIELDS, ConfigError, TrainConfig
from experiments.data import Dataset, Split
from experiments.train import NonFiniteLossError
from larnn_jax import BNLSTMCell, LARNNCell
from larnn_jax.cell import CELL_NORM_PLACEMENTS, MODES
from larnn_jax.normalization import NORM_KINDS
from larnn_jax.scans import SCANS

CLASSES = 3


def make_dataset(path: pathlib.Path, *, train_rows: int = 960, steps: int = 10) -> pathlib.Path:
    """An easy synthetic ``.npz`` task: the class sets the mean of channel 0 and the frequency
    of channel 1. Writes ``X_train, y_train, X_val, y_val, X_test, y_test``."""
    rng = np.random.default_rng(123)

    def rows(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, CLASSES, count)
        time_axis = np.arange(steps)
        x = rng.normal(0.0, 0.3, (count, steps, 3))
        x[:, :, 0] += labels[:, None] - 1.0
        x[:, :, 1] += np.sin(time_axis[None, :] * (labels[:, None] + 1) / 3)
        return x.astype(np.float32), labels

    arrays = {}
    for split, count in (("train", train_rows), ("val", 48), ("test", 60)):
        arrays[f"X_{split}"], arrays[f"y_{split}"] = rows(count)
    np.savez(path, **arrays)
    return path


def tiny_config(data: pathlib.Path, out: pathlib.Path, **overrides: object) -> TrainConfig:
    """A LARNN small enough to compile and train in seconds."""
    values = {
        "model": "larnn",
        "features": 8,
        "num_heads": 2,
        "window_size": 3,
        "num_layers": 2,
        "learning_rate": 0.01,
        "decay_every": 2,
        "epochs": 4,
        "batch_size": 4,
        "dataset": f"npz:{data}",
        "out": str(out),
        "progress": False,
    }
    return TrainConfig(**{**values, **overrides})


def config_flags(config: TrainConfig) -> list[str]:
    """The command-line flags that reproduce ``config``."""
    flags = []
    for name, value in config.to_dict().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def read_lines(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "epoch_seconds"} for line in history]


def f1_scores(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, float]:
    """Macro and weighted F1, counted row by row (no library): each class's F1 is
    ``2·TP / (2·TP + FP + FN)``, 0 for a class neither present nor predicted; weights are the
    classes' row counts."""
    per_class, support = [], []
    for c in range(num_classes):
        pairs = list(zip(labels.tolist(), predictions.tolist(), strict=True))
        tp = sum(1 for label, predicted in pairs if label == c and predicted == c)
        fp = sum(1 for label, predicted in pairs if label != c and predicted == c)
        fn = sum(1 for label, predicted in pairs if label == c and predicted != c)
        per_class.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        support.append(tp + fn)
    return {
        "macro_f1": sum(per_class) / num_classes,
        "weighted_f1": sum(f * n for f, n in zip(per_class, support, strict=True)) / len(labels),
    }


def assert_states_equal(a: dict, b: dict) -> None:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "toy.npz")


@pytest.fixture(scope="module")
def finished_run(data: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted 4-epoch run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    calls = []
    result = train_module.train(
        tiny_config(data, out), epoch_callback=lambda m, d: calls.append((m, d))
    )
    return {"out": out, "report": result, "callbacks": calls}


def test_training_learns_and_writes_every_output(finished_run: dict, data: pathlib.Path) -> None:
    out, result = finished_run["out"], finished_run["report"]
    history = read_lines(out / "metrics.jsonl")
    assert [line["epoch"] for line in history] == [1, 2, 3, 4]
    assert set(history[0]) == {
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "val_diverged",
        "test_loss",
        "test_accuracy",
        "test_diverged",
        "learning_rate",
        "epoch_seconds",
    }
    for line in history:
        assert 0 <= line["val_diverged"] <= 48 and 0 <= line["test_diverged"] <= 60
    # Learning rate 0.01, × 0.75 every 2 epochs (staircase).
    assert [line["learning_rate"] for line in history] == pytest.approx(
        [0.01, 0.01, 0.0075, 0.0075]
    )
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(line["val_accuracy"] for line in history) > 0.8  # chance: 1/3

    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(result))
    selected = report.select_epoch(history)
    assert saved["selection"]["epoch"] == selected
    assert saved["test"]["accuracy"] == history[selected - 1]["test_accuracy"]
    assert saved["test_diverged"] == history[selected - 1]["test_diverged"]
    assert saved["optimistic_protocol_best_test_accuracy"] == max(
        line["test_accuracy"] for line in history
    )
    # The test figures of the selected epoch, from its predictions and the file's labels.
    labels = np.load(data)["y_test"]
    with CheckpointStore(out / "checkpoints", read_only=True) as store:
        predictions = np.asarray(store.restore(4)[1]["selected_test_predictions"])
    assert saved["test"]["accuracy"] == np.mean(predictions == labels)
    for name, value in f1_scores(labels, predictions, CLASSES).items():
        assert saved["test"][name] == pytest.approx(value, rel=1e-12, abs=0), name
    matrix = np.zeros((CLASSES, CLASSES), int)
    np.add.at(matrix, (labels, predictions), 1)
    assert saved["test"]["confusion_matrix"] == matrix.tolist()
    assert saved["test"]["per_class_accuracy"] == {
        str(c): matrix[c, c] / matrix[c].sum() for c in range(CLASSES)
    }
    for key in ("parameter_count", "wall_seconds", "seconds_per_epoch", "machine"):
        assert key in saved
    assert saved["parameter_count"] > 0
    assert (out / "learning_curves.png").stat().st_size > 0
    assert (out / "confusion_matrix.png").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["features"] == 8

    assert [m for m, _ in finished_run["callbacks"]] == history
    assert [d for _, d in finished_run["callbacks"]] == [
        out.absolute() / "checkpoints" / str(epoch) for epoch in (1, 2, 3, 4)
    ]


def test_checkpoints_keep_latest_three_and_the_best(finished_run: dict) -> None:
    out = finished_run["out"]
    history = read_lines(out / "metrics.jsonl")
    with CheckpointStore(out / "checkpoints", read_only=True) as store:
        steps = store.steps()
    assert set(steps) == {2, 3, 4} | {report.select_epoch(history)}
    for step in steps:
        assert verify_step(out / "checkpoints" / str(step)) is None


def test_evaluate_reproduces_the_report(finished_run: dict, capsys) -> None:
    out = finished_run["out"]
    saved = json.loads((out / "report.json").read_text())
    assert evaluate.main(["--checkpoint", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epoch"] == saved["selection"]["epoch"]
    assert printed["test"] == saved["test"]
    assert printed["test_diverged"] == saved["test_diverged"]
    epoch = printed["epoch"]
    assert (out / f"evaluation-epoch{epoch}.json").is_file()
    assert (out / f"evaluation-epoch{epoch}-confusion_matrix.png").is_file()

    last = evaluate.evaluate_checkpoint(out / "checkpoints" / "4")
    assert last["epoch"] == 4
    assert last["test"]["accuracy"] == read_lines(out / "metrics.jsonl")[3]["test_accuracy"]


def test_evaluate_names_an_unusable_checkpoint_with_exit_status_2(
    finished_run: dict, tmp_path: pathlib.Path, capsys
) -> None:
    """A folder without a run, or an epoch without a checkpoint, is a usage error (2), said in
    one line; nothing is written."""
    assert evaluate.main(["--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path}/nowhere is not a run folder, checkpoint folder or checkpoint step\n"
    )
    out = finished_run["out"]
    assert evaluate.main(["--checkpoint", str(out), "--step", "1", "--output", str(tmp_path)]) == 2
    assert "no checkpoint step 1 in" in capsys.readouterr().err
    assert not list(tmp_path.glob("evaluation-*"))


def test_epoch_selection_and_report_without_validation_split() -> None:
    def line(epoch: int, val: float | None, test: float) -> dict:
        return {
            "epoch": epoch,
            "val_accuracy": val,
            "val_loss": None if val is None else 1 - val,
            "test_accuracy": test,
            "epoch_seconds": 1.0,
        }

    assert report.select_epoch([line(1, 0.5, 0.9), line(2, 0.7, 0.6), line(3, 0.7, 0.5)]) == 3
    history = [line(1, None, 0.9), line(2, None, 0.5)]
    assert report.select_epoch(history) == 2
    test = Split(
        np.zeros((4, 2, 1), np.float32),
        np.array([0, 1, 1, 0], np.int32),
        np.array([7, 3, 3, 7], np.int32),
    )
    dataset = Dataset(test, None, test, 2, ("a", "b"), "toy", None, None)
    built = report.build(
        run="r",
        config={"model": "lstm"},
        dataset=dataset,
        history=history,
        test_predictions=np.array([0, 1, 0, 0]),
        parameter_count=1,
        wall_seconds=2.0,
    )
    assert built["selection"]["epoch"] == 2
    assert "no validation split" in built["selection"]["criterion"]
    assert built["test"]["accuracy"] == 0.75
    # Class a: TP 2, FP 1, FN 0 (F1 4/5); class b: TP 1, FP 0, FN 1 (F1 2/3); 2 rows each.
    assert built["test"]["macro_f1"] == pytest.approx((4 / 5 + 2 / 3) / 2, rel=1e-15)
    assert built["test"]["weighted_f1"] == pytest.approx((4 / 5 + 2 / 3) / 2, rel=1e-15)
    assert f1_scores(test.y, np.array([0, 1, 0, 0]), 2) == pytest.approx(
        {"macro_f1": built["test"]["macro_f1"], "weighted_f1": built["test"]["weighted_f1"]}
    )
    assert built["test"]["per_class_accuracy"] == {"a": 1.0, "b": 0.5}
    assert built["test"]["confusion_matrix"] == [[2, 0], [1, 1]]
    # Subject 3's rows are labelled 1, 1 and predicted 1, 0; subject 7's 0, 0 and 0, 0.
    assert built["test"]["per_subject_accuracy"] == {"3": 0.5, "7": 1.0}
    without_subjects = report.classification_figures(test.y, np.array([0, 1, 0, 0]), ("a", "b"))
    assert "per_subject_accuracy" not in without_subjects
    assert built["optimistic_protocol_best_test_accuracy"] == 0.9
    assert built["test_diverged"] is None  # histories recorded before it was counted


def test_diverged_rows_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    """Rows with a non-finite logit or one beyond DIVERGED_LOGIT, through the evaluator too."""
    bound = steps.DIVERGED_LOGIT
    logits = np.array(
        [
            [0.5, -3.0, 20.0],  # finite and small
            [bound, 0.0, -bound],  # at the bound: not diverged
            [10 * bound, 0.0, 0.0],
            [0.0, -1e13, 1.0],
            [np.inf, 0.0, 0.0],
            [0.0, -np.inf, 0.0],
            [np.nan, 0.0, 0.0],
            [1e9, np.nan, -np.inf],
        ],
        np.float32,
    )
    expected = [False, False, True, True, True, True, True, True]
    assert np.asarray(steps.diverged_rows(jnp.asarray(logits))).tolist() == expected

    class Echo:
        """A stand-in model whose logits ``(B, C)`` are its inputs ``(B, 1, C)``."""

        def apply(self, variables: dict, x: jax.Array, deterministic: bool) -> jax.Array:
            return x[:, 0, :]

    split = Split(logits[:, None, :], np.zeros(len(logits), np.int32), None)
    # Batches of 3: the last one is padded with a row of zeros, which is not counted.
    result = steps.make_evaluator(Echo(), batch_size=3)({}, split)
    assert result.diverged == 6
    assert result.loss is None  # non-finite: rows with inf and NaN logits
    assert result.predictions.shape == (8,)
    assert result.probabilities.shape == (8, logits.shape[1])
    finite = np.all(np.isfinite(logits), axis=1)
    np.testing.assert_allclose(
        result.probabilities[finite], jax.nn.softmax(logits[finite], axis=-1), rtol=1e-6
    )

    with caplog.at_level(logging.WARNING, logger="experiments"):
        report.warn_if_diverged(0, 8, 5)
        report.warn_if_diverged(None, 8, 5)
        assert not caplog.records
        report.warn_if_diverged(result.diverged, 8, 5)
    assert "6 of 8 test sequences diverged with the model of epoch 5" in caplog.text


def test_help_lists_every_flag(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in text
    for flag in ("--config", "--resume", "--no-residual-stacking", "--no-standardize"):
        assert flag in text
    assert "default: 0.006026" in text


def test_config_file_and_flag_precedence(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"features": 16, "num_heads": 4, "residual_stacking": False}))
    config, options = train_module.config_from_args(["--config", str(path), "--num-heads", "8"])
    assert (config.features, config.num_heads, config.residual_stacking) == (16, 8, False)
    assert options == {"resume": False, "overwrite": False}
    assert config.learning_rate == TrainConfig().learning_rate

    path.write_text(json.dumps({"features": 16, "featres": 8}))
    with pytest.raises(ConfigError, match=r"unknown config key.*featres"):
        train_module.config_from_args(["--config", str(path)])
    path.write_text(json.dumps({"features": "16"}))
    with pytest.raises(ConfigError, match="features must be int"):
        train_module.config_from_args(["--config", str(path)])
    assert train_module.main(["--config", str(path)]) == 2


def test_the_scan_is_the_configurations_and_checked(
    data: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """``--scan`` reaches the model as it is (nothing inferred); ``remat`` needs its chunk
    length, which must divide T, and a chunk length without ``remat`` is refused naming the fix."""
    assert TrainConfig().scan == "auto"
    assert steps.build_model(TrainConfig(), CLASSES).scan == "auto"
    for scan in ("native", "fused", "plain"):
        config, _ = train_module.config_from_args(["--scan", scan])
        assert steps.build_model(config, CLASSES).scan == scan
    config, _ = train_module.config_from_args(["--scan", "remat", "--remat-chunk-length", "5"])
    model = steps.build_model(config, CLASSES)
    assert (model.scan, model.remat_chunk_length) == ("remat", 5)
    assert steps.build_model(TrainConfig(), CLASSES).remat_chunk_length is None
    with pytest.raises(ConfigError, match="scan remat needs remat_chunk_length"):
        TrainConfig(scan="remat")
    with pytest.raises(
        ConfigError, match="remat_chunk_length 5 is used only by scan remat, not auto: add --scan"
    ):
        train_module.config_from_args(["--remat-chunk-length", "5"])
    with pytest.raises(ConfigError, match="scan must be one of auto, native, fused, plain, remat"):
        TrainConfig(scan="sideways")
    with pytest.raises(ConfigError, match="remat_chunk_length must be >= 1"):
        TrainConfig(scan="remat", remat_chunk_length=0)
    out = tmp_path / "run"
    with pytest.raises(
        ConfigError, match="remat_chunk_length 3 does not divide the sequence length T = 10"
    ):
        train_module.train(tiny_config(data, out, scan="remat", remat_chunk_length=3))
    assert not (out / "metrics.jsonl").exists()


def test_runs_saved_before_the_scan_was_a_field_keep_their_scan(
    finished_run: dict, tmp_path: pathlib.Path
) -> None:
    """A run saved before ``scan`` existed ran rematerialised exactly when it had a
    ``remat_chunk_length``: it is read back so, and resumes."""
    saved = json.loads((finished_run["out"] / "config.json").read_text())
    del saved["scan"]
    assert TrainConfig.from_saved(saved).scan == "auto"
    chunked = {**saved, "remat_chunk_length": 5}
    loaded = TrainConfig.from_saved(chunked)
    assert (loaded.scan, loaded.remat_chunk_length) == ("remat", 5)
    assert TrainConfig.from_saved({**chunked, "scan": "remat"}) == loaded
    out = tmp_path / "old_run"
    shutil.copytree(finished_run["out"], out)
    shutil.rmtree(out / "checkpoints" / "4")
    (out / "config.json").write_text(json.dumps(chunked))
    train_module.train(TrainConfig.from_saved({**chunked, "out": str(out)}), resume=True)
    assert json.loads((out / "config.json").read_text())["scan"] == "remat"
    assert read_lines(out / "metrics.jsonl")[3]["epoch"] == 4


def test_resuming_a_finished_run_leaves_its_files_as_they_are(
    finished_run: dict, tmp_path: pathlib.Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run["out"], out)
    files = ("config.json", "metrics.jsonl", "report.json")
    before = {name: (out / name).read_bytes() for name in files}
    saved = json.loads(before["config.json"])
    result = train_module.train(TrainConfig.from_dict({**saved, "out": str(out)}), resume=True)
    assert {name: (out / name).read_bytes() for name in files} == before
    assert result == json.loads(before["report.json"])


def test_resume_may_change_run_fields_and_paths_are_stored_absolute(
    finished_run: dict, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run["out"], out)
    shutil.rmtree(out / "checkpoints" / "4")
    saved = json.loads((out / "config.json").read_text())
    monkeypatch.chdir(tmp_path)  # relative paths, resolved against it
    config = TrainConfig.from_dict(
        {**saved, "scan": "remat", "remat_chunk_length": 5, "out": "run", "data_dir": "~/har"}
    )
    train_module.train(config, resume=True)
    stored = json.loads((out / "config.json").read_text())
    assert (stored["scan"], stored["remat_chunk_length"]) == ("remat", 5)
    assert stored["out"] == str(out.absolute())
    assert stored["data_dir"] == str(pathlib.Path.home() / "har")
    resumed = read_lines(out / "metrics.jsonl")
    reference = read_lines(finished_run["out"] / "metrics.jsonl")
    assert without_timing(resumed[:3]) == without_timing(reference[:3])
    assert resumed[3]["epoch"] == 4


def test_runs_saved_before_cell_norm_placement_keep_the_papers_placement(
    finished_run: dict, tmp_path: pathlib.Path
) -> None:
    """A run saved without ``cell_norm_placement`` trained with ``BN_c`` on the carried state:
    it is read back that way, and resuming it with today's default says what differs."""
    out = tmp_path / "old_run"
    shutil.copytree(finished_run["out"], out)
    saved = json.loads((out / "config.json").read_text())
    del saved["cell_norm_placement"]
    (out / "config.json").write_text(json.dumps(saved))
    assert TrainConfig.from_saved(saved).cell_norm_placement == "carried"
    assert TrainConfig.from_dict(saved).cell_norm_placement == "output"
    config = TrainConfig.from_dict({**saved, "out": str(out)})
    with pytest.raises(
        ConfigError, match="differs in cell_norm_placement: 'carried' in the run, 'output' now"
    ):
        train_module.train(config, resume=True)


def test_runs_saved_under_older_field_names_resume_and_evaluate(
    data: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run saved under the fields' older names (``checkpoint_every`` for
    ``remat_chunk_length``, ``hidden`` for ``features``, ``window`` for ``window_size``, ...; in
    config.json and in its checkpoints' metadata) evaluates and resumes; a ``--config`` file with
    an old key is refused with the new name."""
    out = tmp_path / "old_run"
    config = tiny_config(
        data, out, model="bnlstm", num_layers=1, epochs=1, scan="remat", remat_chunk_length=5
    )
    old_names = {new: old for old, new in RENAMED_FIELDS.items()}

    def with_old_names(self: TrainConfig) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        del values["scan"]  # a field of later versions
        return {old_names.get(name, name): value for name, value in values.items()}

    with monkeypatch.context() as old_version:
        old_version.setattr(TrainConfig, "to_dict", with_old_names)
        train_module.train(config)
    saved = json.loads((out / "config.json").read_text())
    assert saved["checkpoint_every"] == 5 and "remat_chunk_length" not in saved
    assert (saved["hidden"], saved["window"], saved["layers"]) == (8, 3, 1)
    assert not set(RENAMED_FIELDS.values()) & set(saved)
    assert TrainConfig.from_saved(saved) == config

    evaluation = evaluate.evaluate_checkpoint(out)
    assert evaluation["epoch"] == 1
    assert evaluation["test"]["accuracy"] == read_lines(out / "metrics.jsonl")[0]["test_accuracy"]
    train_module.train(dataclasses.replace(config, epochs=2), resume=True)
    assert [line["epoch"] for line in read_lines(out / "metrics.jsonl")] == [1, 2]
    assert json.loads((out / "config.json").read_text())["remat_chunk_length"] == 5

    path = tmp_path / "old.json"
    path.write_text(json.dumps({"features": 16, "checkpoint_every": 8}))
    with pytest.raises(
        ConfigError, match="checkpoint_every was renamed: use remat_chunk_length instead"
    ):
        train_module.config_from_args(["--config", str(path)])
    assert train_module.main(["--config", str(path)]) == 2
    path.write_text(json.dumps({"hidden": 16, "kv_dropout": 0.2}))
    with pytest.raises(
        ConfigError,
        match="hidden was renamed: use features instead; kv_dropout was renamed: use "
        "kv_dropout_rate instead",
    ):
        train_module.config_from_args(["--config", str(path)])


def test_committed_runs_load_under_todays_names() -> None:
    """Every run configuration under ``results/`` (saved before the cell's settings took the
    cell's names) reads back as the configuration it trained."""
    paths = sorted((pathlib.Path(__file__).resolve().parents[1] / "results").glob("**/config.json"))
    assert paths
    for path in paths:
        saved = json.loads(path.read_text())
        config = TrainConfig.from_saved(saved)
        for old, new in RENAMED_FIELDS.items():
            if old in saved:
                assert getattr(config, new) == saved[old], (path, old)
        cell = config.build_cell()
        assert cell.features == saved.get("hidden", saved.get("features")), path


def test_short_flags_are_aliases_of_the_fields_flags() -> None:
    """The command line keeps the short forms of the cell's settings."""
    config, _ = train_module.config_from_args(
        [
            "--hidden",
            "16",
            "--heads",
            "4",
            "--window",
            "5",
            "--layers",
            "2",
            "--dropout",
            "0.2",
            "--kv-dropout",
            "0.3",
            "--attention-dropout",
            "0.4",
            "--positional-encoding",
            "--no-kv-activation",
        ]
    )
    assert (config.features, config.num_heads, config.window_size, config.num_layers) == (
        16,
        4,
        5,
        2,
    )
    assert (config.dropout_rate, config.kv_dropout_rate, config.attention_dropout_rate) == (
        0.2,
        0.3,
        0.4,
    )
    assert config.use_positional_encoding and not config.activation_on_keys_and_values
    long_form, _ = train_module.config_from_args(
        ["--window-size", "5", "--no-activation-on-keys-and-values"]
    )
    assert long_form.window_size == 5 and not long_form.activation_on_keys_and_values


def test_the_configuration_builds_the_cell_and_the_model() -> None:
    """``build_cell`` makes the cell of ``model`` with every setting; ``build_model`` puts it in
    the classifier, with the configuration's scan."""
    config = TrainConfig(
        features=12,
        num_heads=3,
        window_size=5,
        mode="layer",
        use_positional_encoding=True,
        norm="layer",
    )
    cell = config.build_cell()
    assert isinstance(cell, LARNNCell)
    assert (cell.features, cell.num_heads, cell.window_size, cell.mode) == (12, 3, 5, "layer")
    assert cell.use_positional_encoding and cell.activation_on_keys_and_values
    assert (cell.norm, cell.cell_norm_placement) == ("layer", "output")
    assert (cell.dropout_rate, cell.kv_dropout_rate, cell.attention_dropout_rate) == (
        config.dropout_rate,
        config.kv_dropout_rate,
        config.attention_dropout_rate,
    )
    bnlstm = dataclasses.replace(config, model="bnlstm", cell_norm_placement="carried").build_cell()
    assert isinstance(bnlstm, BNLSTMCell)
    assert (bnlstm.features, bnlstm.norm, bnlstm.cell_norm_placement) == (12, "layer", "carried")
    assert bnlstm.dropout_rate == config.dropout_rate
    lstm = dataclasses.replace(config, model="lstm").build_cell()
    assert type(lstm) is nn.LSTMCell and lstm.features == 12

    model = steps.build_model(config, CLASSES)
    assert model.cell == cell and model.num_classes == CLASSES
    assert (model.num_layers, model.residual_stacking) == (config.num_layers, True)
    assert (model.scan, model.remat_chunk_length) == ("auto", None)
    remat = dataclasses.replace(config, scan="remat", remat_chunk_length=4)
    assert (steps.build_model(remat, CLASSES).scan, remat.remat_chunk_length) == ("remat", 4)

    choices = {field.name: field.metadata.get("choices") for field in dataclasses.fields(config)}
    assert choices["mode"] is MODES and choices["norm"] is NORM_KINDS
    assert choices["cell_norm_placement"] is CELL_NORM_PLACEMENTS and choices["scan"] is SCANS


def test_train_step_donates_the_state() -> None:
    """The jitted step reuses the buffers of the state it is given (which is then deleted)."""
    config = TrainConfig(model="lstm", features=4, num_layers=1)
    model = steps.build_model(config, CLASSES)
    tx = steps.make_optimizer(config, steps_per_epoch=1)
    x = jnp.ones((2, 3, 5))
    state = steps.init_state(model, tx, x, seed=0)
    new_state, loss, _ = steps.make_train_step(model, tx)(
        state, x, jnp.array([0, 1]), jnp.array([0, 1]), 0
    )
    assert np.isfinite(float(loss))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state))


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="multiple of num_heads"):
        TrainConfig(features=10, num_heads=3)
    with pytest.raises(ConfigError, match="dropout_rate"):
        TrainConfig(dropout_rate=1.5)
    with pytest.raises(ConfigError, match="mode must be one of"):
        TrainConfig(mode="sideways")


def test_optimizer_is_pytorch_adam_with_l2_in_the_gradient() -> None:
    """Three steps against PyTorch Adam's update rule with weight_decay, written out in NumPy."""
    config = TrainConfig(learning_rate=0.1, l2=0.01, decay_every=1, decay_factor=0.5)
    steps_per_epoch = 2
    tx = steps.make_optimizer(config, steps_per_epoch)
    theta = np.array([1.0, -2.0, 0.5], np.float32)
    params = jnp.asarray(theta)
    state = tx.init(params)
    m = v = np.zeros(3)
    expected = theta.astype(np.float64)
    for step in range(1, 4):
        grad = np.array([0.3, -0.1, 0.2]) * step
        updates, state = tx.update(jnp.asarray(grad, jnp.float32), state, params)
        params = params + updates
        g = grad + config.l2 * expected
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        lr = 0.1 * 0.5 ** ((step - 1) // steps_per_epoch)
        expected = expected - lr * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
        np.testing.assert_allclose(np.asarray(params), expected, rtol=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    finished_run: dict, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run["out"], out)
    before = (out / "checkpoints" / "4" / "state").stat()
    monkeypatch.setattr(steps, "per_example_loss", lambda logits, labels, *_: logits[:, 0] / 0)
    config = TrainConfig.from_dict({**json.loads((out / "config.json").read_text()), "epochs": 6})
    config = dataclasses.replace(config, out=str(out))
    with pytest.raises(NonFiniteLossError, match="epoch 5, step 1") as error:
        train_module.train(config, resume=True)
    assert (error.value.epoch, error.value.step) == (5, 1)
    assert "checkpoint of epoch 4" in str(error.value)
    with CheckpointStore(out / "checkpoints", read_only=True) as store:
        assert store.latest_step() == 4
    assert verify_step(out / "checkpoints" / "4") is None
    assert (out / "checkpoints" / "4" / "state").stat().st_mtime == before.st_mtime
    assert len(read_lines(out / "metrics.jsonl")) == 4


def test_diverged_evaluation_does_not_stop_the_run(
    finished_run: dict,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A non-finite evaluation loss is recorded (None, with the diverged count), not fatal."""
    out = tmp_path / "run"
    shutil.copytree(finished_run["out"], out)
    make_evaluator = train_module.make_evaluator

    def diverging_evaluator(model: Any, batch_size: int) -> Any:
        evaluate = make_evaluator(model, batch_size)

        def every_row_diverges(variables: Any, split: Split) -> steps.SplitResult:
            result = evaluate(variables, split)
            # A perfect accuracy, so that the last of these epochs is the one selected.
            return dataclasses.replace(result, loss=None, diverged=len(split.y), accuracy=1.0)

        return every_row_diverges

    monkeypatch.setattr(train_module, "make_evaluator", diverging_evaluator)
    config = TrainConfig.from_dict({**json.loads((out / "config.json").read_text()), "epochs": 6})
    config = dataclasses.replace(config, out=str(out))
    with caplog.at_level(logging.WARNING, logger="experiments"):
        figures = train_module.train(config, resume=True)
    lines = read_lines(out / "metrics.jsonl")
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4, 5, 6]
    for line in lines[4:]:
        assert line["val_loss"] is None and line["test_loss"] is None
        assert (line["val_diverged"], line["test_diverged"]) == (48, 60)
        assert math.isfinite(line["train_loss"])
    assert (out / "learning_curves.png").stat().st_size > 0
    assert figures["selection"]["epoch"] == 6
    assert figures["test_diverged"] == 60
    assert "60 of 60 test sequences diverged with the model of epoch 6" in caplog.text


# ------------------------------------------------------------------------------------------------
# Bad settings and run folders: one line, exit status 2, nothing written


def without_validation_split(path: pathlib.Path, **extra: np.ndarray) -> pathlib.Path:
    """The 96 training rows of ``make_dataset`` without its X_val/y_val (and ``extra`` arrays)."""
    arrays = dict(np.load(make_dataset(path.with_name("source.npz"), train_rows=96)))
    del arrays["X_val"], arrays["y_val"]
    np.savez(path, **arrays, **extra)
    return path


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``python -m experiments.train ARGV`` in this process: (exit status, standard error)."""
    status = train_module.main(argv)
    return status, capsys.readouterr().err


def folder_contents(folder: pathlib.Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``folder``, by relative path."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes() if path.is_file() else None
        for path in folder.rglob("*")
    }


def test_settings_that_do_not_fit_the_data_are_usage_errors_before_anything_is_written(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown dataset, a validation split that leaves no training rows, more validation
    subjects than the data has, a batch larger than the data: one line, exit status 2, and no
    run folder."""
    plain = without_validation_split(tmp_path / "plain.npz")
    subjects = without_validation_split(tmp_path / "subjects.npz", subjects_train=np.arange(96) % 3)
    out = tmp_path / "run"
    tiny = ["--hidden", "8", "--heads", "2", "--window", "4", "--layers", "1", "--out", str(out)]
    refused = {
        ("--dataset", "foo"): (
            "dataset: unknown dataset spec 'foo'; expected 'uci_har' or 'npz:PATH'"
        ),
        ("--dataset", f"npz:{plain}", "--validation-fraction", "0.999"): (
            "validation_fraction=0.999 holds out 96 of the 96 training rows, leaving no "
            "training rows"
        ),
        ("--dataset", f"npz:{subjects}"): (
            "validation_subjects=4, but the training data has only 3 subjects"
        ),
        ("--dataset", f"npz:{plain}", "--batch-size", "5000"): (
            "batch_size 5000 exceeds the 77 training rows"
        ),
    }
    for flags, message in refused.items():
        assert run_main([*tiny, *flags], capsys) == (2, f"error: {message}\n")
        assert not out.exists()


def test_a_label_typo_stops_the_run_before_anything_is_written(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1000 among the labels 0..2 (which made a model of 1001 classes, trained to the end): one
    line naming the array and the row, exit status 1 (malformed data), and no run folder."""
    arrays = dict(np.load(without_validation_split(tmp_path / "plain.npz")))
    arrays["y_train"][7] = 1000
    typo = tmp_path / "typo.npz"
    np.savez(typo, **arrays)
    out = tmp_path / "run"
    flags = ["--dataset", f"npz:{typo}", "--model", "lstm", "--hidden", "8", "--out", str(out)]
    assert run_main(flags, capsys) == (
        1,
        f"error: {typo}: y_train[7] = 1000, but no row has a label in 3..999: labels must "
        "number the classes 0..C-1 without gaps (a typo?), or class_names must name all C "
        "classes\n",
    )
    assert not out.exists()


def test_run_folders_that_are_not_this_runs_are_refused_unless_asked(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out naming a file, a folder of other files or another run's folder is refused without
    touching them; --resume on a folder without a run is refused instead of starting a new
    run; --overwrite writes the run into a folder of other files, leaving the others as they
    were; a run stopped before its first checkpoint starts again in its own folder."""
    data = without_validation_split(tmp_path / "toy.npz")
    flags = ["--dataset", f"npz:{data}", "--model", "lstm", "--hidden", "8", "--layers", "1"]
    flags += ["--epochs", "1", "--batch-size", "16", "--no-progress"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("my notes\n")
    assert run_main([*flags, "--out", str(a_file)], capsys) == (
        2,
        f"error: {a_file} is a file, not a run folder; choose another --out\n",
    )
    assert a_file.read_text() == "my notes\n"

    folder = tmp_path / "papers"
    folder.mkdir()
    for name in ("report.json", "summary.csv", "thesis.tex", "z.png"):
        (folder / name).write_text(f"{name} of mine\n")
    assert run_main([*flags, "--out", str(folder)], capsys) == (
        2,
        f"error: {folder} already exists and holds 4 other file(s) and folder(s) (report.json, "
        "summary.csv, thesis.tex, ...); choose another --out, or --overwrite to write this run "
        "into it (replacing its files of the same names)\n",
    )
    assert run_main([*flags, "--out", str(folder), "--resume"], capsys) == (
        2,
        f"error: nothing to resume: {folder} holds no run (no config.json); check --out, or "
        "start a new run there without --resume\n",
    )
    typo = tmp_path / "rnu"
    assert run_main([*flags, "--out", str(typo), "--resume"], capsys) == (
        2,
        f"error: nothing to resume: {typo} does not exist; check --out, or start a new run "
        "there without --resume\n",
    )
    assert not typo.exists()
    assert folder_contents(folder) == {
        name: f"{name} of mine\n".encode()
        for name in ("report.json", "summary.csv", "thesis.tex", "z.png")
    }

    # Another program's folder: a config.json that is not a run's, a checkpoints/ not ours.
    project = tmp_path / "project"
    (project / "checkpoints" / "3").mkdir(parents=True)
    (project / "checkpoints" / "3" / "model.pt").write_bytes(b"weights")
    (project / "report.json").write_text("{}\n")
    for config_text, problem in [
        ('{"lr": 0.1}\n', "keys that no run has: lr"),
        ("{}\n", "keys that every run writes are missing: epochs, model, seed"),
        ("lr: 0.1\n", "not JSON (Expecting value: line 1 column 1 (char 0))"),
    ]:
        (project / "config.json").write_text(config_text)
        before = folder_contents(project)
        assert run_main([*flags, "--out", str(project)], capsys) == (
            2,
            f"error: {project} already exists and holds 3 other file(s) and folder(s) "
            "(checkpoints, config.json, report.json); choose another --out, or --overwrite to "
            "write this run into it (replacing its files of the same names)\n",
        )
        assert run_main([*flags, "--out", str(project), "--resume"], capsys) == (
            2,
            f"error: nothing to resume: {project} holds no run (its config.json is not a run's "
            f"configuration: {problem}); check --out, or start a new run there without "
            "--resume\n",
        )
        assert folder_contents(project) == before

    assert run_main([*flags, "--out", str(folder), "--overwrite"], capsys)[0] == 0
    assert json.loads((folder / "report.json").read_text())["run"] == str(folder)
    assert (folder / "thesis.tex").read_text() == "thesis.tex of mine\n"
    assert len(read_lines(folder / "metrics.jsonl")) == 1

    # Another run's folder (here: this one, with another learning rate) is named as such.
    other = tmp_path / "other"
    other.mkdir()
    saved = json.loads((folder / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**saved, "learning_rate": 0.5}))
    assert run_main([*flags, "--out", str(other)], capsys) == (
        2,
        f"error: {other} already exists and holds another run (its configuration differs in "
        "learning_rate: 0.5 in the run, 0.006026 now); choose another --out, or --overwrite to "
        "write this run into it (replacing its files of the same names)\n",
    )
    # This run's folder before its first checkpoint (a run stopped in epoch 1) starts again,
    # and so does a folder of an empty checkpoints/ only (a run stopped before its config.json).
    (other / "config.json").write_text(json.dumps({**saved, "out": str(other), "epochs": 3}))
    assert run_main([*flags, "--out", str(other)], capsys)[0] == 0
    assert len(read_lines(other / "metrics.jsonl")) == 1
    (tmp_path / "stopped" / "checkpoints").mkdir(parents=True)
    assert run_main([*flags, "--out", str(tmp_path / "stopped")], capsys)[0] == 0


def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line_and_resumes(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Epoch 2's checkpoint cannot be written (a full disk, in a child process): one line says
    so and that epoch 1's is intact (exit status 1), nothing else, neither Orbax's tracebacks
    nor those of its unfinished writes; --resume then trains epochs 2 and 3."""
    data = without_validation_split(tmp_path / "toy.npz")
    out = tmp_path / "run"
    flags = ["--dataset", f"npz:{data}", "--model", "lstm", "--hidden", "8", "--layers", "1"]
    flags += ["--epochs", "3", "--batch-size", "16", "--no-progress", "--out", str(out)]
    failed = run_training(flags, disk_full_before_checkpoint=2)
    assert (failed.returncode, failed.stderr) == (
        1,
        f"error: could not save the checkpoint of epoch 2 in {out / 'checkpoints'} ([Errno 27] "
        "File too large); the checkpoint of epoch 1 is intact: resume the run (--resume) once "
        "the problem is solved\n",
    )
    first = read_lines(out / "metrics.jsonl")
    assert [line["epoch"] for line in first] == [1]
    assert verify_step(out / "checkpoints" / "1") is None

    assert run_main([*flags, "--resume"], capsys) == (
        0,
        f"INFO experiments.train: resuming {out} from the checkpoint of epoch 1\n",
    )
    resumed = read_lines(out / "metrics.jsonl")
    assert [line["epoch"] for line in resumed] == [1, 2, 3]
    assert resumed[0] == first[0]
    with CheckpointStore(out / "checkpoints", read_only=True) as store:
        assert store.steps() == [1, 2, 3]
