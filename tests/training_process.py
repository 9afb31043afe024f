"""``python -m experiments.train`` in a child process, optionally killed (SIGKILL) at an exact
point, or with a full disk from a given checkpoint on.

    python tests/training_process.py [--kill-before-step N | --kill-before-manifest EPOCH |
        --disk-full-before-checkpoint EPOCH] -- TRAIN FLAGS

``--kill-before-step N``: the process kills itself just before the ``N``-th training step it runs
(1: its first, whatever epoch it starts from).
``--kill-before-manifest EPOCH``: the process kills itself once Orbax has committed the checkpoint
of ``EPOCH`` and before its ``sha256sums.json`` is written, leaving the step folder a crash
during saving leaves. The kill is ``os.kill(os.getpid(), SIGKILL)``: nothing is cleaned up, as
with a real crash, and the point does not depend on timing.
``--disk-full-before-checkpoint EPOCH``: from the save of ``EPOCH``'s checkpoint on, no file of
the process can grow beyond 1000 bytes (its file size limit; a write beyond it fails with EFBIG
as one on a full disk fails with ENOSPC): what the command line shows of a failed save, Orbax's
threads and the interpreter's shutdown included.

Runs that tests compare bit for bit all start through :func:`run_training`, which gives them the
same platform and matrix-product precision (:data:`CHILD_ENVIRONMENT`), whatever the machine.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: What every child run gets: the CPU backend (GPU kernels may round differently, or in another
#: order, from one process to the next) and float32 matrix products at full precision, as in this
#: test process (tests/conftest.py).
CHILD_ENVIRONMENT = {"JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}

#: How long a child run may take before the test fails instead of hanging (seconds).
CHILD_TIMEOUT = 300


def child_environment() -> dict[str, str]:
    """This process's environment with :data:`CHILD_ENVIRONMENT` and the repository first on
    ``PYTHONPATH`` (so that the children import this working tree's packages)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **CHILD_ENVIRONMENT, "PYTHONPATH": path}


def run_training(
    flags: Sequence[str],
    *,
    kill_before_step: int | None = None,
    kill_before_manifest: int | None = None,
    disk_full_before_checkpoint: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m experiments.train FLAGS`` in a child process and waits for it.

    Returns:
        The finished process, its output captured (``returncode`` is ``-SIGKILL`` when a kill
        point was reached).
    """
    kill: list[str] = []
    if kill_before_step is not None:
        kill += ["--kill-before-step", str(kill_before_step)]
    if kill_before_manifest is not None:
        kill += ["--kill-before-manifest", str(kill_before_manifest)]
    if disk_full_before_checkpoint is not None:
        kill += ["--disk-full-before-checkpoint", str(disk_full_before_checkpoint)]
    return subprocess.run(
        [sys.executable, str(pathlib.Path(__file__)), *kill, "--", *flags],
        cwd=ROOT,
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )


def _kill_this_process() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_before_step(step: int) -> None:
    """Makes the training loop kill the process just before its ``step``-th training step."""
    from experiments import train

    make_train_step = train.make_train_step

    def counting_make_train_step(*args: Any, **kwargs: Any) -> Any:
        train_step = make_train_step(*args, **kwargs)
        calls = 0

        def counted(*step_args: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == step:
                _kill_this_process()
            return train_step(*step_args)

        return counted

    train.make_train_step = counting_make_train_step


def _kill_before_manifest(epoch: int) -> None:
    """Makes the checkpoint store kill the process before the manifest of ``epoch``'s step."""
    from experiments import checkpoints

    write_manifest = checkpoints.write_manifest

    def interrupted_write_manifest(step_dir: pathlib.Path) -> None:
        if step_dir.name == str(epoch):
            _kill_this_process()
        write_manifest(step_dir)

    checkpoints.write_manifest = interrupted_write_manifest


def _disk_full_before_checkpoint(epoch: int) -> None:
    """Makes every file write that goes beyond 1000 bytes fail from the save of ``epoch``'s
    checkpoint on."""
    from experiments.checkpoints import CheckpointStore

    save = CheckpointStore.save

    def save_into_a_full_disk(store: CheckpointStore, step: int, *args: Any) -> None:
        if step == epoch:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a fatal signal
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
        save(store, step, *args)

    CheckpointStore.save = save_into_a_full_disk


def main(argv: Sequence[str] | None = None) -> int:
    """Installs the kill point, then runs ``experiments.train.main`` on the remaining flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill-before-step", type=int, metavar="N")
    parser.add_argument("--kill-before-manifest", type=int, metavar="EPOCH")
    parser.add_argument("--disk-full-before-checkpoint", type=int, metavar="EPOCH")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.kill_before_step is not None:
        _kill_before_step(args.kill_before_step)
    if args.kill_before_manifest is not None:
        _kill_before_manifest(args.kill_before_manifest)
    if args.disk_full_before_checkpoint is not None:
        _disk_full_before_checkpoint(args.disk_full_before_checkpoint)
    from experiments import train

    flags = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    return train.main(flags)


if __name__ == "__main__":
    sys.exit(main())
