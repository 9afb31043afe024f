"""An ensemble of runs averages their class probabilities at each run's honest epoch."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from test_train import CLASSES, make_dataset, tiny_config

from experiments import ensemble, restore, results_table, steps
from experiments import train as train_module
from experiments.prediction.predictor import Predictor

pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """Two seeds of a 3-epoch BN-LSTM on one dataset, and a run on another dataset."""
    root = tmp_path_factory.mktemp("ensemble-runs")
    data = make_dataset(root / "toy.npz", train_rows=96)
    other = make_dataset(root / "other.npz", train_rows=120)  # other test labels
    folders = {}
    for name, dataset, seed in (("seed0", data, 0), ("seed1", data, 1), ("other", other, 0)):
        folders[name] = root / name
        config = tiny_config(
            dataset, folders[name], model="bnlstm", num_layers=1, epochs=3, seed=seed
        )
        train_module.train(config)
    folders["data"] = data
    return folders


def test_the_ensemble_averages_the_probabilities_of_each_runs_honest_epoch(
    runs: dict[str, pathlib.Path],
) -> None:
    result = ensemble.evaluate_ensemble([runs["seed0"], runs["seed1"]])
    reports = [json.loads((runs[name] / "report.json").read_text()) for name in ("seed0", "seed1")]
    assert result["dataset"] == "toy"
    assert result["members"] == [
        {
            "run": name,
            "epoch": saved["selection"]["epoch"],
            "test_accuracy": saved["test"]["accuracy"],
            "test_diverged": 0,
        }
        for name, saved in zip(("seed0", "seed1"), reports, strict=True)
    ]
    # The same average through another path: each run's predictor on the raw test rows.
    arrays = np.load(runs["data"])
    probabilities = [
        Predictor.from_run(runs[name]).predict(arrays["X_test"]) for name in ("seed0", "seed1")
    ]
    predicted = np.mean(probabilities, axis=0).argmax(axis=-1)
    matrix = np.zeros((CLASSES, CLASSES), int)
    np.add.at(matrix, (arrays["y_test"], predicted), 1)
    assert result["test"]["confusion_matrix"] == matrix.tolist()
    assert result["test"]["accuracy"] == np.mean(predicted == arrays["y_test"])

    alone = ensemble.evaluate_ensemble([runs["seed0"]])
    assert alone["test"] == reports[0]["test"]


def test_the_command_writes_its_file_and_never_replaces_one_unasked(
    runs: dict[str, pathlib.Path], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "seeds.json"
    members = [str(runs["seed0"]), str(runs["seed1"])]
    assert ensemble.main([*members, "--output", str(output)]) == 0
    written = json.loads(output.read_text())
    assert json.loads(capsys.readouterr().out) == written
    assert [member["run"] for member in written["members"]] == ["seed0", "seed1"]

    output.write_text("mine\n")
    assert ensemble.main([*members, "--output", str(output)]) == 2
    assert capsys.readouterr().err == (
        f"error: --output {output} exists already; choose another file, or --overwrite\n"
    )
    assert output.read_text() == "mine\n"
    assert ensemble.main([*members, "--output", str(output), "--overwrite"]) == 0
    assert json.loads(output.read_text()) == written


def test_runs_that_cannot_be_averaged_are_named_in_one_line(
    runs: dict[str, pathlib.Path],
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    output = tmp_path / "out.json"
    cases = {
        (str(runs["seed0"]), str(runs["other"])): (
            f"error: {runs['other']}: its test set (other, 60 sequences) is not that of "
            f"{runs['seed0']} (toy, 60 sequences)\n"
        ),
        (str(runs["seed0"]), str(tmp_path / "nowhere")): (
            f"error: {tmp_path}/nowhere is not a run folder, checkpoint folder or checkpoint step\n"
        ),
    }
    for members, message in cases.items():
        assert ensemble.main([*members, "--output", str(output)]) == 2
        assert capsys.readouterr().err == message
        assert not output.exists()

    # A run whose test sequences diverged (non-finite probabilities) is refused, not averaged.
    def diverging_evaluator(model: Any, batch_size: int) -> Callable[..., steps.SplitResult]:
        evaluate = steps.make_evaluator(model, batch_size)
        return lambda variables, split: dataclasses.replace(evaluate(variables, split), diverged=2)

    monkeypatch.setattr(restore, "make_evaluator", diverging_evaluator)
    epoch = json.loads((runs["seed0"] / "report.json").read_text())["selection"]["epoch"]
    assert ensemble.main([str(runs["seed0"]), "--output", str(output)]) == 2
    assert capsys.readouterr().err == (
        f"error: {runs['seed0']}: 2 test sequences diverged at epoch {epoch}; their "
        "probabilities cannot be averaged\n"
    )
    assert not output.exists()


def test_the_results_table_lists_ensembles_of_its_runs_only(
    runs: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    results = tmp_path / "results"
    for name in ("seed0", "seed1"):
        (results / name).mkdir(parents=True)
        for file in ("config.json", "metrics.jsonl", "report.json"):
            (results / name / file).write_bytes((runs[name] / file).read_bytes())
    (results / "ensembles").mkdir()
    path = results / "ensembles" / "bnlstm-seeds.json"
    assert ensemble.main([str(runs["seed0"]), str(runs["seed1"]), "--output", str(path)]) == 0
    written = json.loads(path.read_text())
    loaded = results_table.load_results(results)
    accuracies = [run.report["test"]["accuracy"] for run in loaded]
    line = results_table.ensemble_table(loaded, results).splitlines()[-1]
    assert line.startswith(f"| `bnlstm-seeds` | {loaded[0].variant} | 2 | selected on validation |")
    assert line.endswith(
        f"| **{written['test']['accuracy']:.4f}** | {written['test']['weighted_f1']:.4f} |"
    )
    assert f"{np.mean(accuracies):.4f} ± {np.std(accuracies, ddof=1):.4f}" in line
    assert "Ensembles of a variant's seeds" in results_table.tables(loaded, results)

    written["members"][1]["test_accuracy"] += 0.01  # not the committed run's figure
    path.write_text(json.dumps(written))
    with pytest.raises(SystemExit, match=r"member seed1 .* is not a run under .* honest epoch"):
        results_table.ensemble_table(loaded, results)
