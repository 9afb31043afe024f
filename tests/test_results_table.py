"""The results tables of the documentation come from the committed run files, and say what they
hold."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from experiments import results_table
from experiments.config import TrainConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent


def write_run(folder: pathlib.Path, *, seed: int, accuracy: float, **config) -> None:
    """A run folder with the three files the tables read; two epochs, epoch 2 selected."""
    folder.mkdir(parents=True)
    full = {**TrainConfig().to_dict(), "seed": seed, "out": str(folder), **config}
    (folder / "config.json").write_text(json.dumps(full))
    history = [
        {"epoch": 1, "val_accuracy": 0.5, "val_diverged": 0, "test_diverged": 2},
        {"epoch": 2, "val_accuracy": 0.75, "val_diverged": 1, "test_diverged": 0},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in history))
    report = {
        "epochs": 2,
        "selection": {"epoch": 2, "val_accuracy": 0.75},
        "test": {"accuracy": accuracy, "weighted_f1": accuracy - 0.01},
        "optimistic_protocol_best_test_accuracy": accuracy + 0.02,
        "optimistic_protocol_best_test_epoch": 1,
        "seconds_per_epoch": {"median": 12.4},
    }
    (folder / "report.json").write_text(json.dumps(report))


@pytest.fixture
def results(tmp_path: pathlib.Path) -> pathlib.Path:
    write_run(tmp_path / "larnn-seed0", seed=0, accuracy=0.90)
    write_run(tmp_path / "larnn-seed1", seed=1, accuracy=0.92)
    write_run(tmp_path / "carried-seed0", seed=0, accuracy=0.8, cell_norm_placement="carried")
    write_run(tmp_path / "lstm-seed3", seed=3, accuracy=0.85, model="lstm", epochs=25)
    (tmp_path / "unfinished").mkdir()  # no report.json: not a row
    return tmp_path


def generated_tables(results: pathlib.Path) -> str:
    """The three tables that ``--write`` puts into a ``results`` section."""
    return results_table.tables(results_table.load_results(results), results)


def test_tables_group_seeds_into_variants(results: pathlib.Path) -> None:
    text = generated_tables(results)
    summary, runs = text.split("\n\nEvery run:\n\n")
    assert summary.splitlines()[-3:] == [
        "| LARNN | 2 | selected on validation | **0.9100 ± 0.0141** | 0.9000 ± 0.0141 "
        "| 0.9300 ± 0.0141 |",
        "| LARNN cell_norm_placement=carried | 1 | selected on validation | **0.8000** | 0.7900 "
        "| 0.8200 |",
        "| LSTM (Flax) epochs=25 | 1 | selected on validation | **0.8500** | 0.8400 | 0.8700 |",
    ]
    assert runs.splitlines()[2] == (
        "| LARNN | `larnn-seed0` | 0 | 2 | 2 | 0.7500 | **0.9000** | 0.8900 | 0.9200 (1) "
        "| 1 / 2 | 12 |"
    )
    assert len(runs.splitlines()) == 2 + 4


def write_evaluation(folder: pathlib.Path, epoch: int, accuracy: float, **per_subject) -> None:
    """What ``python -m experiments.evaluate`` writes for ``epoch`` (the parts the tables read)."""
    test = {"accuracy": accuracy, "per_subject_accuracy": per_subject}
    (folder / f"evaluation-epoch{epoch}.json").write_text(
        json.dumps({"epoch": epoch, "test": test})
    )


def test_subject_table_from_reports_or_the_selected_epochs_evaluation(
    results: pathlib.Path,
) -> None:
    report_path = results / "larnn-seed1/report.json"
    report = json.loads(report_path.read_text())
    report["test"]["per_subject_accuracy"] = {"10": 0.5, "9": 0.75}
    report_path.write_text(json.dumps(report))
    write_evaluation(results / "larnn-seed0", 2, 0.90, **{"9": 0.95, "10": 0.6})
    write_evaluation(results / "larnn-seed0", 1, 0.90, **{"9": 0.0, "10": 0.0})  # not selected
    write_evaluation(results / "lstm-seed3", 1, 0.85, **{"9": 0.0, "10": 0.0})  # not selected
    text = generated_tables(results)
    assert "Honest test accuracy on each test subject" in text
    subjects = text.split("mean over the seeds):\n\n")[1].split("\n\n")[0].splitlines()
    assert subjects == [
        "| variant | seeds | subject 9 | subject 10 |",
        "|---|---:|---:|---:|",
        "| LARNN | 2 | 0.850 | 0.550 |",  # the other variants' runs do not all know theirs
    ]
    # An evaluation that disagrees with its run's report is named, not averaged in.
    write_evaluation(results / "carried-seed0", 2, 0.81, **{"9": 1.0, "10": 1.0})
    with pytest.raises(SystemExit, match=r"carried-seed0/evaluation-epoch2\.json gives test acc"):
        generated_tables(results)


def test_write_then_check_round_trips(results: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """``--write`` fills every section of every file given, the summary alone where a file asks
    for it; ``--check`` then passes, and fails again once a file's section is stale."""
    start, end = results_table.markers("results")
    summary_start, summary_end = results_table.markers("results-summary")
    page = tmp_path / "results.md"
    page.write_text(f"intro\n{start}\nold\n{end}\nend\n")
    front = tmp_path / "README.md"
    front.write_text(f"top\n{summary_start}\nold\n{summary_end}\nbottom\n")
    files = [str(page), str(front)]
    assert results_table.main(["--results", str(results), "--check", *files]) == 1
    assert results_table.main(["--results", str(results), "--write", *files]) == 0
    assert results_table.main(["--results", str(results), "--check", *files]) == 0
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{end}\nend\n")
    assert "| LARNN | 2 |" in text and "Every run:" in text and "old" not in text
    headline = front.read_text()
    assert headline.startswith("top\n") and headline.endswith(f"{summary_end}\nbottom\n")
    assert "| LARNN | 2 |" in headline and "Every run:" not in headline
    front.write_text(headline.replace("| LARNN | 2 |", "| LARNN | 3 |"))
    assert results_table.main(["--results", str(results), "--check", *files]) == 1


def test_missing_markers_and_empty_results_are_named(results: pathlib.Path, tmp_path) -> None:
    readme = tmp_path / "plain.md"
    readme.write_text("no tables here\n")
    with pytest.raises(SystemExit, match=re.escape(f"{readme} has no results section")):
        results_table.main(["--results", str(results), "--check", str(readme)])
    start, _ = results_table.markers("results")
    readme.write_text(f"{start}\nno end\n")
    with pytest.raises(SystemExit, match="do not match"):
        results_table.main(["--results", str(results), "--write", str(readme)])
    assert readme.read_text() == f"{start}\nno end\n"
    with pytest.raises(SystemExit, match=r"no run folder with a report\.json under"):
        results_table.load_results(tmp_path / "nothing")


@pytest.mark.skipif(
    not (ROOT / "results/uci_har").is_dir(), reason="no run of results/uci_har committed yet"
)
def test_the_documented_tables_are_generated_from_the_committed_runs(monkeypatch) -> None:
    """The tables of docs/results.md and the README's summary are exactly what the script makes
    of ``results/uci_har``."""
    monkeypatch.chdir(ROOT)
    documents = ["docs/results.md", "README.md"]
    assert results_table.main(["--results", "results/uci_har", "--check", *documents]) == 0


def write_screen_run(folder: pathlib.Path, seed: int, shift: float, **config) -> None:
    """A screening run: 6 epochs, validation subjects 10 + seed and 20 + seed, raw weights
    ``shift`` above a reference, the moving average 0.01 above the raw weights."""
    write_run(folder, seed=seed, accuracy=0.9, **config)
    history = []
    for epoch in range(1, 7):
        raw = 0.8 + 0.01 * epoch + shift
        subjects = {str(10 + seed): raw - 0.1, str(20 + seed): raw + 0.1}
        history.append(
            {
                "epoch": epoch,
                "val_accuracy": raw + 0.01,
                "raw_val_accuracy": raw,
                "val_subject_accuracy": {k: v + 0.01 for k, v in subjects.items()},
                "raw_val_subject_accuracy": subjects,
            }
        )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in history))


def test_a_variant_that_stacks_on_another_is_compared_with_it(tmp_path: pathlib.Path) -> None:
    """``warp-ls`` adds label smoothing to ``warp``: its differences are to ``warp``, seed by seed;
    ``ls`` alone, and ``jitter`` (not a part of ``warp-ls``), are compared with the reference."""
    write_screen_run(tmp_path / "base-seed0", 0, 0.0)
    write_screen_run(tmp_path / "warp-seed0", 0, 0.02, time_warp_sigma=0.2)
    write_screen_run(tmp_path / "ls-seed0", 0, 0.01, label_smoothing=0.1)
    write_screen_run(tmp_path / "jitter-seed0", 0, -0.01, jitter_sigma=0.1)
    write_screen_run(tmp_path / "warp-ls-seed0", 0, 0.03, time_warp_sigma=0.2, label_smoothing=0.1)
    text = results_table.screen_tables(results_table.load_runs(tmp_path), tmp_path, "base")
    summary = text.split("validation subject")[0]
    rows = {line.split(" | ")[0]: line for line in summary.splitlines() if line.startswith("| `")}
    assert rows["| `warp-ls`"].startswith(
        "| `warp-ls` | label_smoothing=0.1 time_warp_sigma=0.2 | `warp` | 0 | 0.8900 (+0.0100, 1/1 up)"
    )
    assert rows["| `ls`"].startswith("| `ls` | label_smoothing=0.1 | `base` | 0 | 0.8700 (+0.0100")
    assert rows["| `jitter`"].startswith(
        "| `jitter` | jitter_sigma=0.1 | `base` | 0 | 0.8500 (-0.0100"
    )
    # A variant with the reference's settings (another name, another folder) is compared with it.
    write_screen_run(tmp_path / "again-seed0", 0, 0.01)
    text = results_table.screen_tables(results_table.load_runs(tmp_path), tmp_path, "base")
    assert "| `again` | (the reference) | `base` | 0 | 0.8700 (+0.0100, 1/1 up)" in text


def test_screen_tables_compare_each_variant_with_the_reference_seed_by_seed(
    tmp_path: pathlib.Path,
) -> None:
    for seed in (0, 1):
        write_screen_run(tmp_path / f"base-seed{seed}", seed, 0.0)
        write_screen_run(
            tmp_path / f"warp-seed{seed}", seed, 0.02 - 0.03 * seed, time_warp_sigma=0.2
        )
    text = results_table.screen_tables(results_table.load_runs(tmp_path), tmp_path, "base")
    lines = text.splitlines()
    assert lines[2].startswith(
        "| variant | changes from the reference | compared with | seeds | best val acc, raw"
    )
    # best: 0.86 (+ shift); last 5 epochs: mean of 0.82 .. 0.86 = 0.84 (+ shift).
    assert lines[4] == ("| `base` | (the reference) |  | 0 1 | 0.8600 | 0.8400 | 0.8700 | 0.8500 |")
    assert lines[5] == (
        "| `warp` | time_warp_sigma=0.2 | `base` | 0 1 | 0.8650 (+0.0050, 1/2 up) "
        "| 0.8450 (+0.0050, 1/2 up) | 0.8750 (+0.0050, 1/2 up) | 0.8550 (+0.0050, 1/2 up) |"
    )
    subjects = text.split("validation subject")[-1].splitlines()
    assert subjects[2] == "| variant | subject 10 | subject 11 | subject 20 | subject 21 |"
    assert subjects[4] == "| `base` | 0.740 | 0.740 | 0.940 | 0.940 |"
    assert subjects[5] == "| `warp` | 0.760 | 0.730 | 0.960 | 0.930 |"
    with pytest.raises(SystemExit, match="no run folder baseline-seed"):
        results_table.screen_tables(results_table.load_runs(tmp_path), tmp_path)
    # Only the folders directly under the results folder are runs.
    write_run(tmp_path / "nested" / "deeper-seed0", seed=0, accuracy=0.5)
    assert [run.name for run in results_table.load_runs(tmp_path)] == [
        "base-seed0",
        "base-seed1",
        "warp-seed0",
        "warp-seed1",
    ]
    # The screen section of a Markdown file.
    doc = tmp_path / "recipe.md"
    doc.write_text("text\n<!-- screen:start -->\n<!-- screen:end -->\n")
    for seed in (0, 1):
        (tmp_path / f"base-seed{seed}").rename(tmp_path / f"baseline-seed{seed}")
    assert results_table.main(["--results", str(tmp_path), "--write", str(doc)]) == 0
    assert "| `warp` | time_warp_sigma=0.2 | `baseline` | 0 1 | 0.8650 (+0.0050, 1/2 up)" in (
        doc.read_text()
    )


def test_a_run_without_validation_split_has_no_validation_figures(tmp_path: pathlib.Path) -> None:
    write_run(tmp_path / "all21-seed0", seed=0, accuracy=0.9, validation_subjects=0)
    report_path = tmp_path / "all21-seed0" / "report.json"
    report = json.loads(report_path.read_text())
    report["selection"]["val_accuracy"] = None
    report_path.write_text(json.dumps(report))
    history = [{"epoch": 1, "val_accuracy": None, "val_diverged": None, "test_diverged": 0}]
    (tmp_path / "all21-seed0" / "metrics.jsonl").write_text(json.dumps(history[0]) + "\n")
    lines = results_table.tables(results_table.load_runs(tmp_path), tmp_path).splitlines()
    assert lines[-1] == (
        "| LARNN validation_subjects=0 | `all21-seed0` | 0 | 2 | 2 | – | **0.9000** | 0.8900 "
        "| 0.9200 (1) | – / 0 | 12 |"
    )
    # The summary says where the honest figure comes from: the final epoch.
    assert (
        "| LARNN validation_subjects=0 | 1 | final epoch (no validation) | **0.9000** | 0.8900 "
        "| 0.9200 |"
    ) in lines
