"""Exported models: ``python -m experiments.export`` and :mod:`larnn_jax.exported`.

The exported classifier gives the probabilities of the run's own model (``Predictor.from_run``)
for LARNN, BN-LSTM and LSTM runs, at every batch size and sequence length from one file; its
one-step function streams as the run's stream does; it loads and predicts in an interpreter where
Flax, Optax and Orbax cannot be imported; damaged files and other format versions are refused,
each with one line that says which and why. On UCI HAR (slow): all 2,947 test sequences.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import jax
import numpy as np
import pytest
from test_dependencies import PIPELINE_MODULES
from test_train import make_dataset, tiny_config

from experiments import export as export_command
from experiments import predict
from experiments import train as train_module
from experiments.checkpoints import MANIFEST_NAME
from experiments.data.uci_har import load_uci_har
from experiments.files import sha256_file
from experiments.prediction import Predictor, sliding_windows
from larnn_jax import exported
from larnn_jax.native.build import TARGETS
from larnn_jax.scans import NATIVE_SWITCH, choose_scan

ROOT = pathlib.Path(__file__).resolve().parents[1]
T, C = 10, 3  # the tiny dataset's sequence length and channels
MODELS = ("larnn", "bnlstm", "lstm")
#: What the loader must not need.
TRAINING_MODULES = ("flax", "optax", "orbax", "orbax.checkpoint", *PIPELINE_MODULES)


pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "toy.npz", train_rows=240)


@pytest.fixture(scope="module")
def runs(data: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """A tiny run of each model: 1 epoch; the LARNN with positional encoding."""
    folder = tmp_path_factory.mktemp("runs")
    runs = {}
    for model in MODELS:
        extra = {"use_positional_encoding": True} if model == "larnn" else {}
        config = tiny_config(data, folder / model, model=model, epochs=1, **extra)
        train_module.train(config)
        runs[model] = folder / model
    return runs


@pytest.fixture(scope="module")
def files(
    runs: dict[str, pathlib.Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, pathlib.Path]:
    """Each run exported by the command line."""
    folder = tmp_path_factory.mktemp("exported")
    files = {}
    for model, run in runs.items():
        files[model] = folder / f"{model}.larnn"
        assert export_command.main(["--checkpoint", str(run), "--output", str(files[model])]) == 0
    return files


@pytest.fixture(scope="module")
def test_x(data: pathlib.Path) -> np.ndarray:
    return np.load(data)["X_test"]


def test_the_command_records_the_run_beside_the_model(
    runs: dict[str, pathlib.Path], files: dict[str, pathlib.Path], capsys
) -> None:
    model = exported.load(files["larnn"])
    predictor = Predictor.from_run(runs["larnn"])
    metadata = model.metadata
    assert (metadata["format"], metadata["format_version"]) == ("larnn_jax.exported", 1)
    assert metadata["platforms"] == ["cpu", "cuda"]
    assert (model.window_length, model.channels) == (T, C)
    assert model.class_names == predictor.class_names == ("0", "1", "2")
    np.testing.assert_array_equal(model.channel_mean, predictor.preprocessing.channel_mean)
    np.testing.assert_array_equal(model.channel_std, predictor.preprocessing.channel_std)
    source = model.source
    assert source["epoch"] == predictor.epoch
    assert source["checkpoint"] == str(predictor.checkpoint_dir)
    manifest = predictor.checkpoint_dir / MANIFEST_NAME
    assert source["checkpoint_sha256"] == sha256_file(manifest)
    assert re.fullmatch(r"[0-9a-f]{64}", source["checkpoint_sha256"])
    assert source["config"] == json.loads((runs["larnn"] / "config.json").read_text())
    assert source["preprocessing"] == predictor.preprocessing.to_dict()


def test_the_command_writes_no_file_over_another_unasked(
    runs: dict[str, pathlib.Path], tmp_path: pathlib.Path, capsys
) -> None:
    output = tmp_path / "model.larnn"
    output.write_text("keep me")
    args = ["--checkpoint", str(runs["lstm"]), "--output", str(output)]
    assert export_command.main(args) == 2
    assert capsys.readouterr().err == (
        f"error: --output {output} exists already; choose another file, or --overwrite\n"
    )
    assert output.read_text() == "keep me"
    assert export_command.main([*args, "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bytes"] == output.stat().st_size
    assert exported.load(output).class_names == ("0", "1", "2")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.larnn"]  # no temporary


def assert_near_the_native_steps(probabilities: np.ndarray, native_step: np.ndarray) -> None:
    """The native step rounds apart from the XLA scans (float32; 2.5e-6 measured on the tiny
    task's 10 steps): the same probabilities to 1e-4, the same class wherever the first two are
    further apart."""
    np.testing.assert_allclose(probabilities, native_step, rtol=0, atol=1e-4)
    top_two = np.sort(native_step, axis=-1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 2e-4
    np.testing.assert_array_equal(probabilities.argmax(-1)[clear], native_step.argmax(-1)[clear])


@pytest.mark.parametrize("model", MODELS)
def test_exported_predictions_equal_the_runs(
    model: str,
    runs: dict[str, pathlib.Path],
    files: dict[str, pathlib.Path],
    test_x: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded = exported.load(files[model])
    probabilities = loaded.predict(test_x)
    assert probabilities.shape == (60, 3) and probabilities.dtype == np.float32
    if model == "larnn":  # the run's model as it runs here: the native step where available
        native_step = Predictor.from_run(runs[model]).predict(test_x)
        assert_near_the_native_steps(probabilities, native_step)
    monkeypatch.setenv(NATIVE_SWITCH, "0")  # the XLA scans, as exported
    predictor = Predictor.from_run(runs[model])
    expected = predictor.predict(test_x)
    np.testing.assert_array_equal(probabilities.argmax(-1), expected.argmax(-1))
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-6)
    # One file, every batch size and sequence length (shorter and longer than T), with lengths.
    for rows, steps in ((1, T), (7, 4), (60, 17)):
        x = np.tile(test_x[:rows], (1, 2, 1))[:, :steps]
        np.testing.assert_allclose(
            loaded.predict(x, batch_size=rows),
            predictor.predict(x, batch_size=rows),
            rtol=0,
            atol=1e-6,
        )
    lengths = np.array([T, 3, 7, 1])
    np.testing.assert_allclose(
        loaded.predict(test_x[:4], lengths),
        predictor.predict(test_x[:4], lengths),
        rtol=0,
        atol=1e-6,
    )


@pytest.mark.parametrize("model", ["larnn", "lstm"])
@pytest.mark.parametrize("stride", [5, 3])
def test_the_exported_step_streams_as_the_run_does(
    model: str,
    stride: int,
    runs: dict[str, pathlib.Path],
    files: dict[str, pathlib.Path],
    test_x: np.ndarray,
) -> None:
    recording = test_x.reshape(-1, C)[:43]
    expected = [p for p in map(Predictor.from_run(runs[model]).stream(stride).push, recording) if p]
    stream = exported.load(files[model]).stream(stride)
    assert stream.slots == -(-T // stride)
    predictions = [p for p in map(stream.push, recording) if p is not None]
    _, starts = sliding_windows(recording, T, stride)
    assert [p.start_step for p in predictions] == [p.start_step for p in expected]
    assert [p.start_step for p in predictions] == starts.tolist()
    np.testing.assert_allclose(
        np.stack([p.probabilities for p in predictions]),
        np.stack([p.probabilities for p in expected]),
        rtol=0,
        atol=1e-6,
    )


def test_the_export_runs_the_xla_scan_never_the_native_step(
    runs: dict[str, pathlib.Path], files: dict[str, pathlib.Path]
) -> None:
    config = json.loads((runs["larnn"] / "config.json").read_text())
    assert config["scan"] == "auto"  # the run's own model runs the native step where it can
    with zipfile.ZipFile(files["larnn"]) as archive:
        for name in (exported.CLASSIFIER, exported.STEP):
            text = jax.export.deserialize(bytearray(archive.read(name))).mlir_module()
            assert ("stablehlo.while" in text) == (name == exported.CLASSIFIER)  # the scan
            assert not [target for target in TARGETS if target in text], name
    predictor = Predictor.from_run(runs["larnn"])
    if choose_scan("auto", predictor.model.cell, training=False, dtype=np.float32) == "native":
        assert any(target in _lowered_auto_classifier(predictor) for target in TARGETS)


def _lowered_auto_classifier(predictor: Predictor) -> str:
    """The run's own model (scan='auto') lowered: where 'auto' runs the native step, it calls
    it, so that the check above can fail."""
    x = np.zeros((2, T, C), np.float32)
    apply = jax.jit(lambda x: predictor.model.apply(predictor.variables, x, deterministic=True))
    return apply.lower(x).as_text()


SCRIPT = """
import sys

for name in {modules!r}:
    sys.modules[name] = None  # importing it now raises ImportError

import numpy as np
from larnn_jax import exported

model = exported.load({path!r})
x = np.load({inputs!r})
np.save({probabilities!r}, model.predict(x))
stream = model.stream(5)
np.save({streamed!r}, np.stack([p.probabilities for p in map(stream.push, x[0]) if p]))
loaded = sorted(
    name
    for name, module in sys.modules.items()
    if module is not None and name.split(".")[0] in ("flax", "optax", "orbax")
)
assert not loaded, loaded
print("ok")
"""


def test_the_export_loads_and_predicts_without_flax(
    files: dict[str, pathlib.Path], test_x: np.ndarray, tmp_path: pathlib.Path
) -> None:
    inputs = tmp_path / "x.npy"
    np.save(inputs, test_x[:6])
    script = SCRIPT.format(
        modules=TRAINING_MODULES,
        path=str(files["larnn"]),
        inputs=str(inputs),
        probabilities=str(tmp_path / "p.npy"),
        streamed=str(tmp_path / "s.npy"),
    )
    run_script(sys.executable, script)
    model = exported.load(files["larnn"])
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), model.predict(test_x[:6]))
    stream = model.stream(5)
    streamed = np.stack([p.probabilities for p in map(stream.push, test_x[0]) if p])
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), streamed)


def run_script(python: str | os.PathLike[str], script: str, **options: object) -> None:
    """Runs ``script`` with ``python`` in the repository's folder; it must print ``ok``."""
    done = subprocess.run(
        [str(python), "-c", textwrap.dedent(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        **options,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.slow
def test_a_fresh_environment_with_only_jax_and_numpy_loads_the_export(
    files: dict[str, pathlib.Path], test_x: np.ndarray, tmp_path: pathlib.Path
) -> None:
    """A new virtual environment with this JAX, its flatbuffers and NumPy installed, nothing
    else (packages from the index or pip's cache), and the repository on its path."""
    environment = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(environment)], check=True, timeout=300)
    python = environment / "bin" / "python"
    packages = [f"jax=={jax.__version__}", f"jaxlib=={jax.__version__}", "numpy", "flatbuffers"]
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *packages],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {line.split("==")[0].lower() for line in listed.split()}
    assert not names & {"flax", "optax", "orbax-checkpoint"}, names
    inputs = tmp_path / "x.npy"
    np.save(inputs, test_x[:6])
    script = SCRIPT.format(
        modules=(),
        path=str(files["lstm"]),
        inputs=str(inputs),
        probabilities=str(tmp_path / "p.npy"),
        streamed=str(tmp_path / "s.npy"),
    )
    run_script(python, script, env={**os.environ, "PYTHONPATH": str(ROOT)})
    model = exported.load(files["lstm"])
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), model.predict(test_x[:6]))


def test_predict_runs_an_exported_model_as_it_runs_the_run(
    runs: dict[str, pathlib.Path],
    files: dict[str, pathlib.Path],
    data: pathlib.Path,
    tmp_path: pathlib.Path,
    capsys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(NATIVE_SWITCH, "0")  # the run's model on the XLA scans, as exported
    summaries = {}
    for name, source in (
        ("run", ["--checkpoint", str(runs["larnn"])]),
        ("file", ["--exported", str(files["larnn"])]),
    ):
        output = tmp_path / f"{name}.csv"
        assert predict.main([*source, "--input", str(data), "--output", str(output)]) == 0
        summaries[name] = json.loads(capsys.readouterr().out)
    # The same batches, the same arithmetic: the same file, to the last digit.
    assert (tmp_path / "file.csv").read_text() == (tmp_path / "run.csv").read_text()
    run, file = summaries["run"], summaries["file"]
    assert file.pop("exported") == str(files["larnn"])
    assert run.pop("checkpoint") == str(Predictor.from_run(runs["larnn"]).checkpoint_dir)
    for summary in (run, file):
        del summary["seconds"], summary["output"]
    assert file == run
    assert run["sequences"] == 60 and 0 < run["accuracy"] <= 1

    lines = "".join(",".join(map(repr, row.tolist())) + "\n" for row in np.load(data)["X_test"][0])
    out, err = io.StringIO(), io.StringIO()
    summary = predict.run_stream(
        predict.ExportedPredictor(files["larnn"]), lines.splitlines(True), 5, out, err, "csv"
    )
    assert (summary["samples"], summary["predictions"], err.getvalue()) == (T, 1, "")


def test_predict_takes_one_model(
    runs: dict[str, pathlib.Path], files: dict[str, pathlib.Path], data: pathlib.Path, capsys
) -> None:
    for args in (
        ["--input", str(data)],
        ["--checkpoint", str(runs["larnn"]), "--exported", str(files["larnn"]), "--input", "x"],
        ["--exported", str(files["larnn"]), "--step", "1", "--input", str(data)],
    ):
        with pytest.raises(SystemExit) as stopped:
            predict.main(args)
        assert stopped.value.code == 2
    assert capsys.readouterr().err.count("error: ") == 3


# ------------------------------------------------------------------------------------------------
# Damaged files and other versions


def _rewritten(source: pathlib.Path, target: pathlib.Path, change) -> pathlib.Path:
    """A copy of the archive ``source`` whose metadata is ``change(metadata)``."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as copy:
        for info in archive.infolist():
            data = archive.read(info.filename)
            if info.filename == exported.METADATA:
                data = json.dumps(change(json.loads(data))).encode()
            copy.writestr(info.filename, data)
    return target


def test_damaged_files_and_other_versions_are_refused_saying_which_and_why(
    files: dict[str, pathlib.Path], data: pathlib.Path, tmp_path: pathlib.Path, capsys
) -> None:
    good = files["bnlstm"]
    size = good.stat().st_size
    cut = tmp_path / "cut.larnn"
    cut.write_bytes(good.read_bytes()[: size // 2])
    flipped = tmp_path / "flipped.larnn"
    shutil.copy(good, flipped)
    with zipfile.ZipFile(good) as archive:
        info = archive.getinfo(exported.CLASSIFIER)
    with open(flipped, "r+b") as file:  # a byte in the middle of the classifier's data
        file.seek(info.header_offset + 30 + len(info.filename) + info.compress_size // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0x40]))
    newer = _rewritten(good, tmp_path / "newer.larnn", lambda m: {**m, "format_version": 2})
    swapped = _rewritten(
        good,
        tmp_path / "swapped.larnn",
        lambda m: {**m, "members": {**m["members"], exported.STEP: "0" * 64}},
    )
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with zipfile.ZipFile(good) as archive:
        step_digest = json.loads(archive.read(exported.METADATA))["members"][exported.STEP]
    expected = {
        cut: f"{cut}: not an exported model: not a zip archive (File is not a zip file); the "
        "file is damaged, cut short, or of another kind",
        flipped: f"{flipped}: damaged: classifier.jaxexport cannot be read (Bad CRC-32 for file "
        "'classifier.jaxexport')",
        newer: f"{newer}: format version 2, written by larnn_jax 0.1.0; this larnn_jax (0.1.0) "
        "reads format version 1 only: export the model again, or load it with the larnn_jax "
        "that wrote it",
        swapped: f"{swapped}: damaged: step.jaxexport has SHA-256 {step_digest}, metadata.json "
        f"records {'0' * 64}",
        other: f"{other}: not an exported model: the zip archive has no metadata.json",
        tmp_path / "absent.larnn": f"{tmp_path / 'absent.larnn'}: no such file",
    }
    for path, message in expected.items():
        with pytest.raises(exported.ExportFormatError) as refused:
            exported.load(path)
        assert str(refused.value) == message
        assert predict.main(["--exported", str(path), "--input", str(data)]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"


# ------------------------------------------------------------------------------------------------
# UCI HAR


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_exported_predictions_equal_the_runs_on_the_uci_har_test_set(
    model: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One epoch of a small model on the real data; the 2,947 test sequences."""
    data_dir = os.environ.get("LARNN_DATA_DIR")
    if not data_dir or not (pathlib.Path(data_dir) / "UCI HAR Dataset").is_dir():
        pytest.skip("UCI HAR is not at $LARNN_DATA_DIR")
    config = tiny_config(
        pathlib.Path(data_dir),
        tmp_path / "run",
        model=model,
        dataset="uci_har",
        data_dir=data_dir,
        features=16,
        num_heads=4,
        window_size=4,
        epochs=1,
        batch_size=128,
        validation_subjects=0,
    )
    train_module.train(config)
    output = tmp_path / "model.larnn"
    assert export_command.main(["--checkpoint", str(config.out), "--output", str(output)]) == 0
    _, test, class_names = load_uci_har(data_dir, download=False)
    assert test.x.shape == (2947, 128, 9)
    loaded = exported.load(output)
    probabilities = loaded.predict(test.x)
    # The XLA scans, as exported. (The native step rounds apart from them over 128 steps: up to
    # 3.6e-4 on a few sequences in one run, a chaotic trajectory amplifying float32 rounding.)
    monkeypatch.setenv(NATIVE_SWITCH, "0")
    predictor = Predictor.from_run(config.out)
    assert loaded.class_names == predictor.class_names == class_names
    expected = predictor.predict(test.x)
    np.testing.assert_array_equal(probabilities.argmax(-1), expected.argmax(-1))
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-6)
