"""Training killed with SIGKILL, then resumed: the same results, bit for bit, as an uninterrupted run.

Every run here, the uninterrupted one included, is a child process started by
:func:`training_process.run_training`: all of them compute on the same platform with the same
matrix-product precision, and each kill lands at an exact point (a training step, or between
Orbax's commit of a checkpoint and its manifest), not after some time.
"""

from __future__ import annotations

import pathlib
import signal
import subprocess

import pytest
from test_train import (
    assert_states_equal,
    config_flags,
    make_dataset,
    read_lines,
    tiny_config,
    without_timing,
)
from training_process import run_training

from experiments import restore
from experiments.checkpoints import MANIFEST_NAME, QUARANTINE_DIR, CheckpointStore

TRAIN_ROWS = 96
#: tiny_config's batch size is 4.
STEPS_PER_EPOCH = TRAIN_ROWS // 4
#: tiny_config's LARNN (every dropout on) with one layer: quicker to compile, in every child.
CONFIG = {"num_layers": 1}


def finished(process: subprocess.CompletedProcess[str]) -> str:
    """The log (stderr) of a child run that must have succeeded."""
    assert process.returncode == 0, process.stderr[-3000:]
    return process.stderr


def killed(process: subprocess.CompletedProcess[str]) -> str:
    """The log of a child run that must have been killed by its kill point (and not failed
    before it)."""
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
    return process.stderr


def assert_same_run(run: pathlib.Path, reference: pathlib.Path) -> None:
    """The two runs recorded the same metrics and ended in the same state, bit for bit."""
    assert without_timing(read_lines(run / "metrics.jsonl")) == without_timing(
        read_lines(reference / "metrics.jsonl")
    )
    assert_states_equal(
        restore.restore_run(run, step=4).state, restore.restore_run(reference, step=4).state
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "toy.npz", train_rows=TRAIN_ROWS)


@pytest.fixture(scope="module")
def reference(data: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The uninterrupted 4-epoch run, in a child process."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    finished(run_training(config_flags(tiny_config(data, out, **CONFIG))))
    return out


@pytest.mark.slow
def test_run_killed_during_an_epoch_and_while_saving_resumes_bitwise(
    data: pathlib.Path, reference: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """Killed inside epoch 2, resumed from checkpoint 1; killed again between Orbax's commit of
    checkpoint 3 and its manifest, resumed from checkpoint 2 (step 3 set aside); then run to the
    end: the same metrics and final state as the uninterrupted run."""
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    flags = config_flags(tiny_config(data, out, **CONFIG))

    killed(run_training(flags, kill_before_step=STEPS_PER_EPOCH + 10))  # inside epoch 2
    assert [line["epoch"] for line in read_lines(out / "metrics.jsonl")] == [1]
    with CheckpointStore(checkpoints, read_only=True) as store:
        assert store.steps() == [1]

    log = killed(run_training([*flags, "--resume"], kill_before_manifest=3))
    assert f"INFO experiments.train: resuming {out} from the checkpoint of epoch 1\n" in log
    assert "WARNING" not in log
    # Orbax committed step 3 (its folder has its final name and state), the manifest is absent.
    assert (checkpoints / "3" / "state").is_dir()
    assert not (checkpoints / "3" / MANIFEST_NAME).exists()
    assert [line["epoch"] for line in read_lines(out / "metrics.jsonl")] == [1, 2]

    log = finished(run_training([*flags, "--resume"]))
    (quarantined,) = (checkpoints / QUARANTINE_DIR).iterdir()
    assert quarantined.name.startswith("3-")
    assert (
        f"WARNING experiments.checkpoints: checkpoint step 3 ({checkpoints / '3'}) is unusable: "
        f"it has no {MANIFEST_NAME}, so its save never completed; moved it to {quarantined} (an "
        "older checkpoint, if any, is used instead)\n"
    ) in log
    assert f"INFO experiments.train: resuming {out} from the checkpoint of epoch 2\n" in log
    assert_same_run(out, reference)
