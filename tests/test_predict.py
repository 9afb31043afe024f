"""Predictions of a trained run on new data: files, streams, the run's preprocessing, bad input."""

from __future__ import annotations

import io
import json
import logging
import pathlib
import re
import shutil
import sys

import numpy as np
import pytest
from test_benchmarks import read_json
from test_train import make_dataset, read_lines, tiny_config

from benchmarks import stream_predict
from experiments import predict
from experiments import train as train_module
from experiments.checkpoints import CheckpointStore
from experiments.config import TrainConfig, load_config_dataset
from experiments.prediction import Predictor, read_input, sliding_windows
from experiments.preprocessing import PREPROCESSING_FILE, Preprocessing
from larnn_jax import native
from larnn_jax.inference import TOO_LARGE_FOR_THE_MODEL

T, C = 10, 3  # the tiny dataset's sequence length and channels


pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "toy.npz")


@pytest.fixture(scope="module")
def run(data: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train_module.train(tiny_config(data, out, epochs=3))
    return out


@pytest.fixture(scope="module")
def predictor(run: pathlib.Path) -> Predictor:
    return Predictor.from_run(run)


@pytest.fixture(scope="module")
def series(data: pathlib.Path) -> np.ndarray:
    """47 raw time steps: the first test sequences end to end, cut short."""
    return np.load(data)["X_test"].reshape(-1, C)[:47]


def write_csv(path: pathlib.Path, rows: np.ndarray, header: str | None = None) -> pathlib.Path:
    lines = [header] if header else []
    lines += [",".join(repr(float(v)) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# The run's model on files


def test_predict_gives_the_reports_test_accuracy(
    run: pathlib.Path, data: pathlib.Path, tmp_path: pathlib.Path, capsys
) -> None:
    saved = json.loads((run / "report.json").read_text())
    output = tmp_path / "predictions.csv"
    capsys.readouterr()
    assert (
        predict.main(["--checkpoint", str(run), "--input", str(data), "--output", str(output)]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    selected = saved["selection"]["epoch"]
    assert summary["epoch"] == selected
    assert summary["sequences"] == 60
    assert summary["accuracy"] == saved["test"]["accuracy"]
    assert summary["output"] == str(output)

    lines = output.read_text().splitlines()
    assert lines[0] == "sequence,predicted,p_0,p_1,p_2"
    rows = [line.split(",") for line in lines[1:]]
    assert [int(row[0]) for row in rows] == list(range(60))
    with CheckpointStore(run / "checkpoints", read_only=True) as store:
        _, meta = store.restore(store.latest_step())
    assert [int(row[1]) for row in rows] == meta["selected_test_predictions"]
    probabilities = np.array([[float(p) for p in row[2:]] for row in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    counts = np.bincount([int(row[1]) for row in rows], minlength=3)
    assert summary["predicted"] == {"0": int(counts[0]), "1": int(counts[1]), "2": int(counts[2])}

    # Another epoch: the accuracy its line of metrics.jsonl recorded.
    history = read_lines(run / "metrics.jsonl")
    assert (
        predict.main(
            [
                "--checkpoint",
                str(run),
                "--step",
                "3",
                "--input",
                str(data),
                "--output",
                str(tmp_path / "step3.jsonl"),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["epoch"] == 3
    assert summary["accuracy"] == history[2]["test_accuracy"]
    first = json.loads((tmp_path / "step3.jsonl").read_text().splitlines()[0])
    assert list(first) == ["sequence", "predicted", "probabilities"]
    assert list(first["probabilities"]) == ["0", "1", "2"]


def test_training_saves_the_preprocessing_and_older_runs_recompute_it(
    run: pathlib.Path, tmp_path: pathlib.Path, caplog
) -> None:
    config = TrainConfig.from_saved(json.loads((run / "config.json").read_text()))
    dataset = load_config_dataset(config)
    saved = json.loads((run / PREPROCESSING_FILE).read_text())
    assert saved == {
        "dataset": "toy",
        "steps": T,
        "channels": C,
        "standardize": True,
        "channel_mean": [float(v) for v in dataset.channel_mean],
        "channel_std": [float(v) for v in dataset.channel_std],
        "class_names": ["0", "1", "2"],
    }
    read = Preprocessing.from_dict(saved, "preprocessing.json")
    np.testing.assert_array_equal(read.channel_mean, dataset.channel_mean)  # exact, float32
    np.testing.assert_array_equal(read.channel_std, dataset.channel_std)

    older = tmp_path / "older"
    shutil.copytree(run, older)
    (older / PREPROCESSING_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="experiments.preprocessing"):
        recomputed = Predictor.from_run(older).preprocessing
    messages = [r.getMessage() for r in caplog.records if r.name == "experiments.preprocessing"]
    assert messages == [
        f"{older} has no preprocessing.json (the run was saved before runs recorded it): "
        "recomputing the standardisation and class names from the run's dataset, as its "
        "training did"
    ]
    assert recomputed.to_dict() == saved
    assert not (older / PREPROCESSING_FILE).exists()  # the run folder is only read


def test_text_is_cut_into_windows_of_the_runs_length(
    predictor: Predictor, series: np.ndarray, tmp_path: pathlib.Path, capsys
) -> None:
    path = write_csv(tmp_path / "series.csv", series, header="acc_x,acc_y,acc_z")
    output = tmp_path / "windows.jsonl"
    args = ["--checkpoint", str(predictor.checkpoint_dir), "--input", str(path), "--stride", "4"]
    capsys.readouterr()
    assert predict.main([*args, "--output", str(output)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sequences"] == 10  # windows at 0, 4, ..., 36; 37 + 10 = 47
    assert summary["windows"] == {
        "length": T,
        "stride": 4,
        "time_steps": 47,
        "time_steps_after_the_last_window": 1,
    }
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["start_step"] for row in rows] == list(range(0, 37, 4))
    windows = np.stack([series[start : start + T] for start in range(0, 37, 4)])
    expected = predictor.predict(windows)
    shown = np.array([list(row["probabilities"].values()) for row in rows])
    np.testing.assert_allclose(shown, expected, rtol=1e-5, atol=1e-6)  # 6 digits shown
    assert [row["predicted"] for row in rows] == [str(k) for k in expected.argmax(-1)]

    # White-space separated text, the same windows; CSV to standard output without --output.
    spaced = tmp_path / "series.txt"
    spaced.write_text("\n".join(" ".join(repr(float(v)) for v in row) for row in series))
    assert predict.main([*args[:3], str(spaced), "--stride", "4"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "sequence,start_step,predicted,p_0,p_1,p_2"
    assert [line.split(",")[1] for line in lines[1:]] == [str(s) for s in range(0, 37, 4)]
    assert json.loads(captured.err[captured.err.index("{") :])["sequences"] == 10


def test_npz_sequences_with_lengths(predictor: Predictor, data: pathlib.Path, tmp_path) -> None:
    x = np.load(data)["X_test"][:4]
    lengths = np.array([T, 3, 7, 1])
    path = tmp_path / "padded.npz"
    np.savez(path, X=x, lengths=lengths)
    sequences = read_input(path, predictor.preprocessing, stride=T)
    np.testing.assert_array_equal(sequences.lengths, lengths)
    probabilities = predictor.predict(sequences.x, sequences.lengths)
    alone = predictor.predict(x[2:3, :7])  # the third sequence without its padding
    np.testing.assert_allclose(probabilities[2], alone[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probabilities[0], predictor.predict(x[:1])[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Streams


@pytest.mark.parametrize("stride", [T, 5, 3, 1, 13], ids=lambda s: f"stride{s}")
def test_stream_gives_the_batch_predictions_of_its_windows(
    predictor: Predictor, series: np.ndarray, stride: int
) -> None:
    stream = predictor.stream(stride)
    assert stream.slots == -(-T // stride)  # T = 10: 1, 2, 4, 10, 1 carries
    predictions = [p for p in map(stream.push, series) if p is not None]
    windows, starts = sliding_windows(series, T, stride)
    assert [p.start_step for p in predictions] == starts.tolist()
    assert [p.window for p in predictions] == list(range(len(starts)))
    streamed = np.stack([p.probabilities for p in predictions])
    np.testing.assert_allclose(streamed, predictor.predict(windows), rtol=1e-5, atol=1e-6)
    assert stream.samples == len(series) == len(stream.latencies)


def test_stream_reports_bad_lines_and_goes_on(predictor: Predictor, series: np.ndarray) -> None:
    good = [",".join(repr(float(v)) for v in row) + "\n" for row in series[:25]]
    clean_out, clean_err = io.StringIO(), io.StringIO()
    clean = predict.run_stream(predictor, good, 5, clean_out, clean_err, "csv")

    bad = ["1,2\n", "1,x,3\n", "nan,1,2\n", "1 2 inf\n", "1e39,0,0\n"]
    lines = ["x,y,z\n", *good[:7], *bad[:3], "\n", "# a comment\n", *good[7:], *bad[3:]]
    out, err = io.StringIO(), io.StringIO()
    summary = predict.run_stream(predictor, lines, 5, out, err, "csv")
    assert err.getvalue().splitlines() == [
        "error: <stdin>: line 9: expected 3 values, one per channel, found 2; skipped",
        "error: <stdin>: line 10: value 2, 'x', is not a number; skipped",
        "error: <stdin>: line 11: value 1, 'nan', is NaN or infinite; skipped",
        "error: <stdin>: line 32: value 3, 'inf', is NaN or infinite; skipped",
        "error: <stdin>: line 33: value 1, '1e39', is too large for float32; skipped",
    ]
    assert out.getvalue() == clean_out.getvalue()  # the carries were left as they were
    assert clean_err.getvalue() == ""
    assert out.getvalue().splitlines()[0] == "sequence,start_step,predicted,p_0,p_1,p_2"
    assert len(out.getvalue().splitlines()) == 1 + 4  # windows at 0, 5, 10, 15 of 25 steps
    assert summary["samples"] == clean["samples"] == 25
    assert (summary["skipped_lines"], clean["skipped_lines"]) == (5, 0)
    assert summary["predictions"] == 4
    latency = summary["latency_per_sample"]
    assert latency["samples"] == 25 and latency["carries"] == 2
    assert 0 < latency["median_us"] <= latency["p99_us"]


def test_stream_ends_with_its_summary_when_interrupted_or_its_reader_leaves(
    predictor: Predictor, series: np.ndarray
) -> None:
    lines = [",".join(repr(float(v)) for v in row) + "\n" for row in series[:25]]

    def interrupted():
        yield from lines[:12]
        raise KeyboardInterrupt

    out = io.StringIO()
    summary = predict.run_stream(predictor, interrupted(), 5, out, io.StringIO(), "csv")
    assert (summary["stopped"], summary["samples"], summary["predictions"]) == (
        "interrupted",
        12,
        1,
    )
    assert len(out.getvalue().splitlines()) == 2

    class ClosedAfterTwoRows(io.StringIO):
        def write(self, text: str) -> int:
            if self.getvalue().count("\n") == 3:  # the header and two rows
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(text)

    closed = ClosedAfterTwoRows()
    summary = predict.run_stream(predictor, lines, 5, closed, io.StringIO(), "csv")
    assert (summary["stopped"], summary["samples"], summary["predictions"]) == (
        "output closed",
        20,  # the third prediction, at sample 20, found the output closed
        2,
    )


def test_stream_rejects_what_it_cannot_use(predictor: Predictor) -> None:
    stream = predictor.stream(4)
    with pytest.raises(ValueError, match=r"^a sample must hold 3 finite numbers; got "):
        stream.push(np.array([1.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match=r"^a sample must hold 3 finite numbers; got "):
        stream.push(np.zeros(4))
    assert stream.samples == 0 and stream.latencies == []
    with pytest.raises(ValueError, match=r"^stride must be >= 1, got 0$"):
        predictor.stream(0)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error, exit status 2, nothing written


def npz(path: pathlib.Path, **arrays: np.ndarray) -> pathlib.Path:
    np.savez(path, **arrays)
    return path


GOOD_STEPS = "\n".join(["0.1,0.2,0.3"] * T)

TEXT_CASES = {
    "wrong-count": (GOOD_STEPS + "\n1,2\n", "line 11: expected 3 values, one per channel, found 2"),
    "spaces-count": ("1 2 3\n4 5 6 7\n", "line 2: expected 3 values, one per channel, found 4"),
    "empty-value": ("1,,3\n", "line 1: value 2, '', is not a number"),
    "not-a-number": ("# t,x,y\n1,2,3\n4,five,6\n", "line 3: value 2, 'five', is not a number"),
    "nan": ("1,2,3\n4,5,NaN\n", "line 2: value 3, 'NaN', is NaN or infinite"),
    "inf": ("1,2,3\n-inf,5,6\n", "line 2: value 1, '-inf', is NaN or infinite"),
    "short": (
        "a,b,c\n1,2,3\n\n4,5,6\n7,8,9\n",
        "line 5: the input ends after 3 time steps, fewer than one window of 10",
    ),
    "header-only": ("a,b,c\n", "the input ends after 0 time steps, fewer than one window of 10"),
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_bad_text_input_is_named_with_file_and_line(
    run: pathlib.Path, tmp_path: pathlib.Path, capsys, case: str
) -> None:
    content, message = TEXT_CASES[case]
    path = tmp_path / "input.csv"
    path.write_text(content)
    output = tmp_path / "out.csv"
    output.write_text("earlier predictions\n")
    capsys.readouterr()
    args = ["--checkpoint", str(run), "--input", str(path), "--output", str(output)]
    assert predict.main(args) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {path}: {message}\n"
    assert captured.out == ""
    assert output.read_text() == "earlier predictions\n"  # untouched


def test_bad_npz_input_and_run_folders(
    run: pathlib.Path, data: pathlib.Path, tmp_path: pathlib.Path, capsys
) -> None:
    x = np.load(data)["X_test"][:2]
    with_nan = x.copy()
    with_nan[1, 4, 2] = np.nan
    empty = tmp_path / "empty-run"
    empty.mkdir()
    cases = [
        (
            npz(tmp_path / "a.npz", X=x[..., :2]),
            "a.npz: X has 2 channels (shape (2, 10, 2)), but the model was trained on 3",
        ),
        (
            npz(tmp_path / "b.npz", inputs=x),
            "b.npz: no array 'X' (nor 'X_test'); expected X (N, T, C) "
            "with optionally lengths (N,) and y (N,) (found: inputs)",
        ),
        (npz(tmp_path / "c.npz", X=with_nan), "c.npz: X[1, 4, 2] = nan is not a finite float32"),
        (
            npz(tmp_path / "d.npz", X=x, lengths=np.array([3, 11])),
            "d.npz: lengths[1] = 11 is outside 1..10",
        ),
        (
            npz(tmp_path / "e.npz", X=x, y=np.array([0, 3])),
            "e.npz: y[1] = 3 is not a class of the model (0..2)",
        ),
        (tmp_path / "missing.csv", "missing.csv: no such file"),
    ]
    for path, message in cases:
        capsys.readouterr()
        assert predict.main(["--checkpoint", str(run), "--input", str(path)]) == 2, message
        assert capsys.readouterr().err == f"error: {tmp_path}/{message}\n"

    for checkpoint, step, message in [
        (empty, None, f"no usable checkpoint in {empty}"),
        (
            tmp_path / "nowhere",
            None,
            f"{tmp_path}/nowhere is not a run folder, checkpoint folder or checkpoint step",
        ),
        (run, "9", f"no checkpoint step 9 in {run}/checkpoints (available: [1, 2, 3])"),
    ]:
        args = ["--checkpoint", str(checkpoint), "--input", str(data)]
        assert predict.main([*args, *(["--step", step] if step else [])]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"


def overflowing(predictor: Predictor, scan: str) -> Predictor:
    """The run's model, its layers on ``scan``, with an input projection whose float32 sums
    overflow on huge values: every unit weighs channels 0 and 1 by 4, so that standardised
    values of 1e38 and 2e38 in them project to +inf, whose sums in the recurrent layer's gates,
    with weights of both signs, are NaN (as trained LSTMs give for some values of 1e38); values
    of the data's size pass as before."""
    params = predictor.variables["params"]
    kernel = np.zeros_like(params["input_projection"]["kernel"])  # (C, H)
    kernel[:2] = 4.0
    projection = {**params["input_projection"], "kernel": kernel}
    variables = {**predictor.variables, "params": {**params, "input_projection": projection}}
    return Predictor(
        predictor.model.clone(scan=scan),
        variables,
        predictor.preprocessing,
        predictor.config,
        predictor.epoch,
        predictor.checkpoint_dir,
    )


@pytest.mark.parametrize(
    "beyond",
    [
        "standardisation",
        "network-fused",
        pytest.param(
            "network-native",
            marks=pytest.mark.skipif(not native.available(), reason="no native LARNN step here"),
        ),
    ],
)
def test_values_that_the_model_takes_beyond_float32_are_refused(
    beyond: str,
    run: pathlib.Path,
    predictor: Predictor,
    series: np.ndarray,
    tmp_path: pathlib.Path,
    capsys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A finite float32 that the standardisation takes beyond float32 (3e38, where the
    channel's standard deviation is below 1), or with which the network's float32 sums
    overflow (its output NaN, through the XLA scans and the native step alike): named in a file
    (exit status 2, no predictions), skipped in a stream (its windows as they were without it),
    refused by the library, instead of NaN probabilities counted as class 0."""
    mean, std = predictor.preprocessing.channel_mean, predictor.preprocessing.channel_std
    huge = series[3].copy()
    if beyond == "standardisation":
        assert std[1] < 1
        model, huge[1] = predictor, 3e38
        problem = (
            f"is too large for the run's standardisation: (x - {mean[1]:.6g}) / {std[1]:.6g} "
            "overflows float32"
        )
        shown = "'3e38'"  # the text of the file, which names the value as it is written
    else:
        model = overflowing(predictor, scan=beyond.removeprefix("network-"))
        huge[:2] = mean[:2] + std[:2] * np.float32([1e38, 2e38])
        problem = TOO_LARGE_FOR_THE_MODEL
        shown = str(huge[1])  # the value read: the largest that the network saw
        monkeypatch.setattr(predict.Predictor, "from_run", lambda *args, **kwargs: model)
    rows = [",".join(repr(float(v)) for v in row) for row in series[:20]]
    rows[3] = ",".join(["0", "3e38", "0"] if beyond == "standardisation" else map(str, huge))
    path = tmp_path / "huge.csv"
    path.write_text("\n".join(rows) + "\n")
    output = tmp_path / "out.csv"
    capsys.readouterr()
    args = ["--checkpoint", str(run), "--input", str(path), "--output", str(output)]
    assert predict.main(args) == 2
    assert capsys.readouterr().err == f"error: {path}: line 4: value 2, {shown}, {problem}\n"
    assert not output.exists()

    windows = np.stack([series[:T], series[5 : 5 + T]]).copy()
    windows[1, 7] = huge
    stored = npz(tmp_path / "huge.npz", X=windows)
    assert predict.main(["--checkpoint", str(run), "--input", str(stored)]) == 2
    assert capsys.readouterr().err == f"error: {stored}: X[1, 7, 1] = {huge[1]!s} {problem}\n"
    with pytest.raises(ValueError, match=re.escape(f"x[1, 7, 1] = {huge[1]!s} {problem}")):
        model.predict(windows)
    assert np.isfinite(model.predict(windows[:1])).all()

    err, predictions = io.StringIO(), io.StringIO()
    summary = predict.run_stream(model, [row + "\n" for row in rows], 5, predictions, err, "csv")
    assert err.getvalue() == f"error: <stdin>: line 4: value 2, {shown}, {problem}; skipped\n"
    assert (summary["samples"], summary["skipped_lines"]) == (19, 1)
    without = io.StringIO()
    predict.run_stream(model, [row + "\n" for row in rows[:3] + rows[4:]], 5, without, err, "csv")
    assert predictions.getvalue() == without.getvalue()


def test_bytes_that_are_not_utf8_spoil_their_line_only(
    run: pathlib.Path,
    series: np.ndarray,
    tmp_path: pathlib.Path,
    capsys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A byte that is not UTF-8 in a number: the stream reports the line and goes on, even when
    standard input decodes strictly (PYTHONIOENCODING=utf-8:strict, some locales); a file names
    the line."""
    rows = [",".join(repr(float(v)) for v in row).encode() for row in series[:20]]
    rows[2] += b"\xff"
    data = b"\n".join(rows) + b"\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), errors="strict"))
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(run), "--stream", "--stride", "5"]) == 0
    captured = capsys.readouterr()
    token = series[2, 2].item().__repr__() + "\ufffd"
    message = f"line 3: value 3, {token!r}, is not a number: the line is not UTF-8 text"
    summary_start = captured.err.index("{")
    assert captured.err[:summary_start] == f"error: <stdin>: {message}; skipped\n"
    assert len(captured.out.splitlines()) == 1 + 2  # the header, windows at steps 0 and 5
    summary = json.loads(captured.err[summary_start:])
    assert (summary["samples"], summary["skipped_lines"]) == (19, 1)

    path = tmp_path / "latin.csv"
    path.write_bytes(b"temp\xe9rature,x,y\n" + data)  # a Latin-1 header is still a header
    assert predict.main(["--checkpoint", str(run), "--input", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: line 4: value 3, {token!r}, is not a number: the line is not UTF-8 text\n"
    )


def test_an_output_that_would_destroy_the_input_or_cannot_be_written_is_refused_first(
    series: np.ndarray, tmp_path: pathlib.Path, capsys
) -> None:
    """--output naming the --input file (or a link to it), a missing folder or a folder: one
    line, exit status 2, before the run is even looked for; the input is left as it was."""
    source = write_csv(tmp_path / "v.csv", series)
    before = source.read_bytes()
    link = tmp_path / "link.csv"
    link.symlink_to(source)
    missing = tmp_path / "missing" / "p.csv"
    refused = {
        source: f"{source} is the input file {source}: writing there would destroy it; choose "
        "another output file",
        link: f"{link} is the input file {source}: writing there would destroy it; choose "
        "another output file",
        missing: f"{missing}: the folder {missing.parent} does not exist",
        tmp_path: f"{tmp_path} is a folder, not a file",
    }
    capsys.readouterr()
    for output, message in refused.items():
        nowhere = tmp_path / "no-run"  # refused before the run is looked for
        args = ["--checkpoint", str(nowhere), "--input", str(source), "--output", str(output)]
        assert predict.main(args) == 2
        assert capsys.readouterr().err == f"error: --output {message}\n"
    assert source.read_bytes() == before
    assert not missing.parent.exists()


# ------------------------------------------------------------------------------------------------
# The latency benchmark


def test_stream_latency_benchmark_at_tiny_sizes(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "stream_predict.json"
    sizes = ["--features", "6", "--num-heads", "2", "--window-size", "3", "--steps", "8"]
    runs = [
        "--inputs",
        "3",
        "--num-layers",
        "2",
        "--strides",
        "8,3",
        "--samples",
        "6",
        "--warmup",
        "1",
    ]
    stream_predict.main(
        [*sizes, *runs, "--repeats", "2", "--models", "larnn,lstm", "--out", str(out)]
    )
    document = read_json(out, "stream_predict")
    assert [(row["model"], row["stride"], row["carries"]) for row in document["rows"]] == [
        ("larnn", 8, 1),
        ("larnn", 3, 3),
        ("lstm", 8, 1),
        ("lstm", 3, 3),
    ]
    for row in document["rows"]:
        assert 0 < row["median_us"] <= row["p99_us"] and row["samples"] == 6
        assert row["cpu_median_us"] > 0
        assert row["recompute_per_sample_us"] == row["recompute_window_us"] / row["stride"]
