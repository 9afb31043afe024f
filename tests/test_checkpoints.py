"""Checkpoints: retention, detection of damaged or incomplete steps, fallback, config checks."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
import threading
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import pytest
from test_train import make_dataset, read_lines, tiny_config, without_timing

from experiments import evaluate, report
from experiments import train as train_module
from experiments.checkpoints import MANIFEST_NAME, QUARANTINE_DIR, CheckpointStore, write_manifest
from experiments.config import ConfigError, TrainConfig

STATE = {"params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(3)}, "step": jnp.int32(0)}


def largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = (p for p in (step_dir / "state").rglob("*") if p.is_file())
    return max(files, key=lambda p: p.stat().st_size)


def save_steps(directory: pathlib.Path, scores: list[float]) -> None:
    with CheckpointStore(directory) as store:
        for step, score in enumerate(scores, start=1):
            state = {**STATE, "step": jnp.int32(step)}
            store.save(step, state, {"epoch": step}, score)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A finished 3-epoch run (BN-LSTM: quick to compile), copied by the tests that change it."""
    root = tmp_path_factory.mktemp("checkpoint-runs")
    data = make_dataset(root / "toy.npz", train_rows=96)
    config = tiny_config(data, root / "run", model="bnlstm", num_layers=1, epochs=3)
    train_module.train(config)
    return root / "run"


def copy_run(run: pathlib.Path, tmp_path: pathlib.Path) -> tuple[pathlib.Path, TrainConfig]:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    saved = json.loads((out / "config.json").read_text())
    return out, TrainConfig.from_dict({**saved, "out": str(out)})


def test_retention_keeps_latest_three_and_best_across_restarts(tmp_path: pathlib.Path) -> None:
    save_steps(tmp_path, [0.5, 0.9, 0.1, 0.2, 0.3])
    with CheckpointStore(tmp_path) as store:
        assert store.steps() == [2, 3, 4, 5]
        # A new session still knows step 2 is the best: its score was saved with it.
        store.save(6, STATE, {"epoch": 6}, 0.0)
        assert store.steps() == [2, 4, 5, 6]
        state, meta = store.restore(5, STATE)
    assert meta == {"epoch": 5}
    assert int(state["step"]) == 5
    np.testing.assert_array_equal(state["params"]["w"], STATE["params"]["w"])


def test_damaged_and_incomplete_steps_are_skipped(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_steps(tmp_path, [0.1, 0.2, 0.3])
    missing = largest_array_file(tmp_path / "3")
    largest_array_file_name = missing.relative_to(tmp_path / "3").as_posix()
    missing.unlink()
    (tmp_path / "2" / MANIFEST_NAME).unlink()  # as if killed between Orbax's commit and ours
    with caplog.at_level(logging.WARNING), CheckpointStore(tmp_path, read_only=True) as store:
        assert store.steps() == [1]
        assert store.bad_steps == {
            2: f"it has no {MANIFEST_NAME}, so its save never completed",
            3: f"file {largest_array_file_name} is missing",
        }
    # Read-only: nothing moved, nothing said (the reader says what it does without them; not
    # even Orbax's notice that the folder is read-only).
    assert caplog.records == []
    assert (tmp_path / "3").is_dir()

    with CheckpointStore(tmp_path) as store:  # writable: set aside, so the steps can be redone
        assert store.steps() == [1]
        store.save(2, STATE, {"epoch": 2}, 0.2)
        assert store.steps() == [1, 2]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / QUARANTINE_DIR).iterdir()) == [
        "2",
        "3",
    ]


def truncate_largest_file(step_dir: pathlib.Path) -> str:
    """Cuts the step's largest array file to 10 bytes; returns the problem verification finds."""
    damaged = largest_array_file(step_dir)
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[:10])
    name = damaged.relative_to(step_dir).as_posix()
    return f"file {name} has 10 bytes instead of {size} (truncated?)"


def flip_a_byte_of_the_largest_file(step_dir: pathlib.Path) -> str:
    """Inverts one byte in the middle of the step's largest array file, keeping its size: only
    the SHA-256 in the manifest can tell."""
    damaged = largest_array_file(step_dir)
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0xFF
    damaged.write_bytes(bytes(content))
    name = damaged.relative_to(step_dir).as_posix()
    return f"file {name} does not match its recorded SHA-256"


def break_the_manifest_json(step_dir: pathlib.Path) -> str:
    """Replaces the manifest by text that is not JSON (a manifest cut short)."""
    (step_dir / MANIFEST_NAME).write_text('{"files": {')
    return (
        f"its {MANIFEST_NAME} is unreadable (Expecting property name enclosed in double quotes: "
        "line 1 column 12 (char 11))"
    )


@pytest.mark.parametrize(
    "damage", [truncate_largest_file, flip_a_byte_of_the_largest_file, break_the_manifest_json]
)
def test_resume_falls_back_from_a_damaged_latest_checkpoint(
    run: pathlib.Path,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[pathlib.Path], str],
) -> None:
    out, config = copy_run(run, tmp_path)
    step_dir = out / "checkpoints" / "3"
    problem = damage(step_dir)
    with caplog.at_level(logging.INFO, logger="experiments"):
        train_module.train(config, resume=True)
    (quarantined,) = (out / "checkpoints" / QUARANTINE_DIR).iterdir()
    assert quarantined.name.startswith("3-")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            "experiments.checkpoints",
            logging.WARNING,
            f"checkpoint step 3 ({step_dir}) is unusable: {problem}; moved it to {quarantined} "
            "(an older checkpoint, if any, is used instead)",
        ),
        ("experiments.train", logging.INFO, f"resuming {out} from the checkpoint of epoch 2"),
    ]
    # Epoch 3 was trained again from checkpoint 2, exactly as the first time.
    assert without_timing(read_lines(out / "metrics.jsonl")) == without_timing(
        read_lines(run / "metrics.jsonl")
    )


def test_resume_with_a_changed_hyperparameter_names_it(
    run: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    out, config = copy_run(run, tmp_path)
    changed = dataclasses.replace(config, learning_rate=0.02, epochs=5)
    with pytest.raises(ConfigError, match=r"learning_rate: 0\.01 in the run, 0\.02 now") as error:
        train_module.train(changed, resume=True)
    assert "epochs" not in str(error.value)  # allowed to change on resume
    # The checkpoint's own copy of the config is checked too.
    (out / "config.json").unlink()
    with pytest.raises(ConfigError, match="features"):
        train_module.train(dataclasses.replace(config, features=6, num_heads=3), resume=True)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train_module.train(config)


def test_closing_a_store_leaves_none_of_its_threads_running(tmp_path: pathlib.Path) -> None:
    """Orbax cleans up temporary folders in a thread that it starts when a store opens; closing
    the store waits for it, so that a command refused right after opening one (e.g. a run
    folder that already holds checkpoints) does not end with that thread's traceback at the
    interpreter's shutdown."""
    save_steps(tmp_path, [0.5])
    (tmp_path / "2.orbax-checkpoint-tmp-1700000000").mkdir()  # what a crash leaves
    for _ in range(5):
        before = set(threading.enumerate())
        CheckpointStore(tmp_path).close()
        # (A closed event loop's executor threads, "asyncio_<n>", end on their own.)
        started = set(threading.enumerate()) - before
        assert [thread.name for thread in started if not thread.name.startswith("asyncio_")] == []
    assert not (tmp_path / "2.orbax-checkpoint-tmp-1700000000").exists()


def test_evaluation_never_uses_another_epoch_than_the_selected_one_unasked(
    run: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The selected epoch's checkpoint damaged, or the latest one (whose metrics could change
    the selection): a usage error naming the problem and the usable epochs, no evaluation
    written; --step still evaluates a usable epoch."""
    out, _ = copy_run(run, tmp_path)
    checkpoints = out / "checkpoints"
    # A run whose last epoch is not the selected one: epoch 3's validation accuracy lowered in
    # its checkpoint (whose manifest is then written anew).
    meta_file = checkpoints / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["history"][2]["val_accuracy"] = 0.0
    meta_file.write_text(json.dumps(meta))
    write_manifest(checkpoints / "3")
    selected = report.select_epoch(meta["history"])
    assert selected < 3
    problem = flip_a_byte_of_the_largest_file(checkpoints / str(selected))
    usable = ", ".join(str(step) for step in (1, 2, 3) if step != selected)
    assert evaluate.main(["--checkpoint", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: the run's selected epoch, {selected}, has no usable checkpoint in {checkpoints} "
        f"({problem}); choose an epoch with --step (usable: {usable})\n"
    )
    assert not list(out.glob("evaluation-*"))

    out, _ = copy_run(run, tmp_path / "latest")
    checkpoints = out / "checkpoints"
    problem = truncate_largest_file(checkpoints / "3")
    assert evaluate.main(["--checkpoint", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: the checkpoint of epoch 3 in {checkpoints} is unusable ({problem}), so the "
        "run's selected epoch cannot be told from the older ones; choose an epoch with --step "
        "(usable: 1, 2)\n"
    )
    assert not list(out.glob("evaluation-*"))
    assert evaluate.main(["--checkpoint", str(out), "--step", "2"]) == 0
    assert capsys.readouterr().err == (
        f"WARNING experiments.restore: checkpoint step 3 in {checkpoints} is unusable: {problem}\n"
    )
    assert json.loads((out / "evaluation-epoch2.json").read_text())["epoch"] == 2
