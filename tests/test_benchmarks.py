"""The benchmark scripts run end to end on tiny sizes and write the JSON they promise.

Each script's ``main`` runs in-process (the memory script's peak-RSS run starts one fresh
process); the sizes are tiny. Only the throughput script runs in the default suite; the others
are marked slow. The shared
helpers of ``benchmarks.harness`` are checked on their own, without compiling anything.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from benchmarks import memory, scaling_length, scaling_window, streaming, throughput
from benchmarks.harness import arguments, output, series, timing, workloads
from experiments.config import TrainConfig
from experiments.steps import build_model
from larnn_jax.reference import ReferenceLARNNCell

TINY = ["--features", "6", "--num-heads", "2", "--window-size", "3"]
COMMON_KEYS = {"machine", "code", "command", "benchmark", "config", "rows"}


def read_json(path: Path, benchmark: str) -> dict[str, Any]:
    """The written JSON, after the checks every script's output must pass."""
    document = json.loads(path.read_text())
    assert COMMON_KEYS <= set(document), set(document)
    assert document["benchmark"] == benchmark
    machine = document["machine"]
    for key in ("platform", "cpu_model", "cpu_cores", "jax", "flax", "device_kind", "backend"):
        assert machine[key], key
    hostname = socket.gethostname()
    if len(hostname) > 3:
        assert hostname not in path.read_text(), "the output names the host"
    return document


@pytest.mark.slow
def test_throughput(tmp_path: Path) -> None:
    """Every model gets a row (torch: a row or a clean skip) with ratios to Flax's LSTM."""
    out = tmp_path / "throughput.json"
    args = [*TINY, "--batch", "4", "--steps", "8", "--num-layers", "1", "--repeats", "1"]
    # larnn_remat runs in test_scaling_length, the naive cell in test_scaling_window.
    models = "larnn,larnn_fused,larnn_plain,lstm,torch_lstm"
    args = [*args, "--warmup", "0", "--models", models]
    throughput.main([*args, "--out", str(out)])
    document = read_json(out, "throughput")
    rows = {row["model"]: row for row in document["rows"]}
    assert set(rows) | set(document["skipped"]) == set(models.split(","))
    assert set(document["skipped"]) <= {"torch_lstm"}
    assert rows["lstm"]["train_vs_lstm"] == pytest.approx(1.0)
    for row in rows.values():
        assert row["train_ms"] > 0 and row["infer_ms"] > 0
        assert row["train_vs_lstm"] > 0 and row["infer_vs_lstm"] > 0
    larnn = rows["larnn"]
    assert larnn["compile_s"] > 0 and larnn["train_memory"]["total_bytes"] > 0
    assert larnn["cpu_user_s"] > 0 and larnn["train_cpu_vs_lstm"] > 0
    assert larnn["infer_cpu_s"] > 0 and larnn["infer_cpu_vs_lstm"] > 0
    assert document["target"]["larnn_train_vs_lstm"] == rows["larnn"]["train_vs_lstm"]
    assert isinstance(document["target"]["met"], bool)
    assert set(document["larnn_speedup"]) == {"larnn_fused", "larnn_plain"}
    for speedup in document["larnn_speedup"].values():
        assert speedup["train"] > 0 and speedup["infer"] > 0
    assert document["larnn_scan"].startswith(("the native step", "the XLA fused scan ("))


@pytest.mark.slow
def test_scaling_length(tmp_path: Path) -> None:
    """Rows per (length, model), crossovers, doubling ratios and the figure."""
    out = tmp_path / "scaling_length.json"
    scaling_length.main(
        [*TINY, "--lengths", "8", "--batch", "2", "--repeats", "1", "--out", str(out)]
    )
    document = read_json(out, "scaling_length")
    measured = {(row["point"], row["model"]) for row in document["rows"]}
    assert measured == {(8, m) for m in scaling_length.MODELS}
    assert set(document["crossover_T"]) == {
        "time_larnn",
        "time_larnn_remat",
        "memory_larnn",
        "memory_larnn_remat",
    }
    assert document["larnn_doubling_ratios"] == []  # no pair from T = 512 up
    assert document["stopped"] == {}
    assert (Path.cwd() / document["figure"]).is_file()


@pytest.mark.slow
def test_scaling_length_runs_the_chosen_models_and_saves_after_every_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--models`` picks the series; the rows so far are saved after every length, marked
    incomplete, so that a run stopped by a time limit keeps them; the final JSON replaces them."""
    out = tmp_path / "scaling_length.json"
    saved: list[dict[str, Any]] = []

    def save_and_read(*args: Any) -> Path:
        path = output.write_partial_json(*args)
        saved.append(json.loads(path.read_text()))
        return path

    monkeypatch.setattr(scaling_length, "write_partial_json", save_and_read)
    args = [*TINY, "--models", "attention", "--lengths", "8,16", "--batch", "2", "--repeats", "1"]
    scaling_length.main([*args, "--warmup", "0", "--out", str(out)])
    assert [[(row["point"], row["model"]) for row in s["rows"]] for s in saved] == [
        [(8, "attention")],
        [(8, "attention"), (16, "attention")],
    ]
    assert [s["complete"] for s in saved] == [False, False]
    document = read_json(out, "scaling_length")
    assert document["complete"] is True
    assert [row["model"] for row in document["rows"]] == ["attention", "attention"]
    assert document["larnn_doubling_ratios"] == [] and document["target"]["met"] is None


def test_unknown_model_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``--models`` (``--cells``) with a name the script does not know stops before any work,
    naming it."""
    with pytest.raises(SystemExit) as raised:
        throughput.main(["--models", "larnn,gru"])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert "'larnn,gru'" in error and "choose from larnn,larnn_fused,larnn_remat" in error
    with pytest.raises(SystemExit):
        streaming.main(["--cells", "larnn/batch,gru"])
    assert "unknown or no cells in 'larnn/batch,gru'" in capsys.readouterr().err


def test_results_go_to_the_committed_results_folder() -> None:
    """By default a script writes beside the committed figures, ``benchmarks/results/``."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    assert output.default_out("throughput") == str(results / "throughput.json")
    assert (results / "throughput.json").is_file()


def test_doubling_ratios() -> None:
    """``time(2T)/time(T)`` for measured pairs from T = 512 up only."""
    rows = [
        {"point": t, "model": "larnn", "median_s": s}
        for t, s in ((256, 1.0), (512, 2.0), (1024, 4.2), (2048, 8.0), (8192, 1.0))
    ]
    ratios = scaling_length.doubling_ratios(rows)
    assert [(r["T"], r["2T"]) for r in ratios] == [(512, 1024), (1024, 2048)]
    assert [r["ratio"] for r in ratios] == pytest.approx([2.1, 8.0 / 4.2])
    assert scaling_length.mean_doubling_ratio(ratios) == pytest.approx(2.0)
    assert scaling_length.mean_doubling_ratio([]) is None


@pytest.mark.slow
def test_scaling_window(tmp_path: Path) -> None:
    """Cached and naive cell at each window size, with their time ratio."""
    out = tmp_path / "scaling_window.json"
    args = [*TINY[:4], "--batch", "4", "--steps", "8", "--num-layers", "1"]
    scaling_window.main([*args, "--windows", "2", "--repeats", "1", "--out", str(out)])
    document = read_json(out, "scaling_window")
    (entry,) = document["table"]
    assert entry["k"] == 2 and entry["speedup"] > 0 and entry["cpu_speedup"] > 0
    assert Path(out.with_suffix(".png")).is_file()


@pytest.mark.slow
def test_streaming(tmp_path: Path) -> None:
    """A median and p99 per cell, and the in-scan cost per step."""
    out = tmp_path / "streaming.json"
    args = [*TINY, "--inputs", "5", "--calls", "5", "--scan-steps", "4", "--repeats", "1"]
    cells = ["larnn/batch", "bnlstm/layer"]
    streaming.main([*args, "--warmup", "1", "--cells", ",".join(cells), "--out", str(out)])
    document = read_json(out, "streaming")
    assert [row["cell"] for row in document["rows"]] == cells
    for row in document["rows"]:
        assert 0 < row["min_us"] <= row["median_us"] <= row["p99_us"]
        assert row["in_scan_us"] > 0 and row["calls"] == 5


@pytest.mark.slow
def test_memory(tmp_path: Path) -> None:
    """The compiled analysis, and the peak RSS of a fresh process that runs one step."""
    out = tmp_path / "memory.json"
    memory.main([*TINY, "--steps", "8", "--batch", "2", "--models", "lstm", "--out", str(out)])
    document = read_json(out, "memory")
    (row,) = document["rows"]
    assert row["memory"]["total_bytes"] > 0 and row["per_sequence_mb"] > 0
    assert row["within_target"] is True  # a tiny model fits in 4 GB
    assert row["peak_rss_gb"] > 0.01, row  # the child process: interpreter, JAX, compiler
    assert row["step_s"] > 0
    assert document["target"]["met"] is None  # no LARNN row


# ---------------------------------------------------------------------------------------------
# benchmarks.harness


def test_workloads_are_the_models_the_training_builds() -> None:
    """A workload is a training configuration (the paper's by default) built by the training's
    ``build_model``; the LARNN variants differ from it only in their scan or cell."""
    assert workloads.Workload("larnn").config() == TrainConfig()
    assert workloads.Workload("larnn").model() == build_model(
        TrainConfig(), workloads.PAPER["classes"]
    )
    small = {
        "steps": 16,
        "features": 6,
        "num_heads": 2,
        "window_size": 3,
        "num_layers": 1,
        "batch": 4,
    }
    config = workloads.Workload("larnn_remat", **small).config()
    assert (config.model, config.scan, config.remat_chunk_length) == ("larnn", "remat", 4)
    assert config.batch_size == 4
    assert (config.features, config.num_heads, config.window_size, config.num_layers) == (
        6,
        2,
        3,
        1,
    )
    models = {block: workloads.Workload(block, **small).model() for block in workloads.BLOCKS}
    scans = {block: model.scan for block, model in models.items()}
    assert scans == {
        "larnn": "auto",
        "larnn_fused": "fused",
        "larnn_remat": "remat",
        "larnn_plain": "plain",
        "larnn_naive": "auto",
        "bnlstm": "auto",
        "lstm": "auto",
    }
    assert isinstance(models["larnn_naive"].cell, ReferenceLARNNCell)
    assert models["larnn_plain"].cell == models["larnn"].cell
    assert workloads.Workload("bnlstm", **small).config().model == "bnlstm"
    with pytest.raises(ValueError, match="block must be one of"):
        workloads.Workload("gru")


def test_interleaved_timings_rotates_and_counts() -> None:
    """Warm-up calls first, then one call per function per repeat, in rotated order."""
    calls: list[str] = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = timing.interleaved_timings(functions, repeats=3, warmup=1)
    assert calls == list("abc" + "abc" + "bca" + "cab")
    assert {name: len(values) for name, values in samples.items()} == {"a": 3, "b": 3, "c": 3}
    summary = timing.summarize([3.0, 1.0, 2.0])
    assert summary["median_s"] == 2.0 and summary["min_s"] == 1.0 and summary["repeats"] == 3


class FakeBench:
    """Stands in for a ``TrainingBench``: a fixed memory need, instant calls."""

    compile_seconds = 0.0

    def __init__(self, total_bytes: int):
        self.memory = {"total_bytes": total_bytes}

    def __call__(self) -> None:
        """Nothing to run."""

    def usage_summary(self) -> dict[str, float]:
        """No CPU use recorded."""
        return {}


def test_measure_series_stops_at_the_memory_budget() -> None:
    """A model whose analysis exceeds the budget stops there; the others go on."""
    saved_counts: list[int] = []
    rows, stopped = series.measure_series(
        [1, 2, 4],
        ["small", "big"],
        lambda model, point: FakeBench(point * (100 if model == "big" else 1)),
        repeats=2,
        warmup=0,
        memory_budget=250,
        time_budget_s=None,
        log=lambda _: None,
        after_point=lambda so_far: saved_counts.append(len(so_far)),
    )
    assert saved_counts == [2, 4, 5]  # the rows so far, after every point
    assert [(row["point"], row["model"]) for row in rows] == [
        (1, "small"),
        (1, "big"),
        (2, "small"),
        (2, "big"),
        (4, "small"),
    ]
    assert set(stopped) == {"big"} and "stopped at 4" in stopped["big"]

    # A series of models that all stop ends there.
    rows, stopped = series.measure_series(
        [1, 2, 4],
        ["big"],
        lambda model, point: FakeBench(point * 100),
        repeats=2,
        warmup=0,
        memory_budget=150,
        time_budget_s=None,
        log=lambda _: None,
    )
    assert [row["point"] for row in rows] == [1] and "stopped at 2" in stopped["big"]


def test_helpers() -> None:
    """Argument helpers, the rematerialisation chunk and the table format."""
    assert arguments.doubling(128, 1024) == "128,256,512,1024"
    assert arguments.int_list("1,2,4") == [1, 2, 4]
    assert workloads.default_remat_chunk_length(4096) == 64
    assert workloads.default_remat_chunk_length(128) in (8, 16)
    table = output.format_table(
        [{"a": 1, "b": 2.5}, {"a": 10}],
        [output.Column("a", "A"), output.Column("b", "B", "{:.1f}")],
    )
    assert table.splitlines() == ["|  A |   B |", "|---:|----:|", "|  1 | 2.5 |", "| 10 |     |"]


@pytest.mark.slow
def test_profile_step(tmp_path: Path) -> None:
    """XLA's operations by kind for each model and, where LARNN runs the native step, its
    sections (a fresh process: the script switches the native step's timers on before it runs)."""
    import subprocess
    import sys

    from larnn_jax import native

    out = tmp_path / "profile_step.json"
    args = [*TINY, "--batch", "4", "--steps", "8", "--num-layers", "1", "--repeats", "1"]
    command = [sys.executable, "-m", "benchmarks.profile_step", *args, "--models", "larnn,lstm"]
    subprocess.run([*command, "--out", str(out)], check=True, cwd=Path(__file__).parents[1])
    document = read_json(out, "profile_step")
    assert set(document["models"]) == {"larnn", "lstm"}
    for result in document["models"].values():
        assert result["thread_seconds_per_step"] > 0 and result["kinds"]
    assert document["models"]["lstm"]["native_sections"] == []
    sections = document["models"]["larnn"]["native_sections"]
    if native.available():
        assert {row["section"] for row in sections} == set(native.PROFILE_SECTIONS)
        assert sum(row["share"] for row in sections) == pytest.approx(1.0)
        assert document["models"]["larnn"]["native_thread_seconds_per_step"] > 0
    else:
        assert sections == []
