"""``python -m experiments.sweep`` with one trial held at an exact point, so that a test can kill
the driver there, however long anything takes.

    python tests/sweep_process.py [--hold LEARNING_RATE:EPOCH] -- SWEEP FLAGS

With ``--hold``, the trial whose learning rate is ``LEARNING_RATE``, once it has reported epoch
``EPOCH`` (its checkpoint is in the experiment's storage by then), waits instead of going on: the
experiment's saved state comes to show that trial at exactly ``EPOCH`` epochs and stays so until
the driver is killed (the trial's worker goes with it). A trial held for :data:`HOLD_SECONDS`
fails instead, so that nothing waits for ever when a test goes wrong.

Trial workers learn of the hold through an environment variable that the driver gives Ray (the
runtime environment of :func:`experiments.sweep.ray_connection`); this script's functions reach
them by value (it runs as ``__main__``), so they need no import path there.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

#: The environment variable that carries ``LEARNING_RATE:EPOCH`` to the trial workers.
HOLD_VARIABLE = "LARNN_SWEEP_HOLD"
#: The longest a trial is held before it fails.
HOLD_SECONDS = 600


def run_trial(point: dict[str, Any]) -> None:
    """:func:`experiments.sweep.run_trial`, holding the trial that ``$LARNN_SWEEP_HOLD`` names
    after it has reported that epoch."""
    from ray import tune

    from experiments import sweep

    hold = os.environ.get(HOLD_VARIABLE)
    if hold:
        learning_rate, epoch = hold.split(":")
        if point["learning_rate"] == float(learning_rate):
            report = tune.report

            def report_then_hold(metrics: dict[str, Any], **kwargs: Any) -> None:
                report(metrics, **kwargs)
                if metrics["epoch"] == int(epoch):
                    threading.Event().wait(HOLD_SECONDS)
                    raise TimeoutError(f"held for {HOLD_SECONDS} s and never killed")

            tune.report = report_then_hold
    sweep.run_trial(point)


def main(argv: Sequence[str] | None = None) -> int:
    """Installs the hold (if any), then runs ``experiments.sweep.main`` on the remaining flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hold", metavar="LEARNING_RATE:EPOCH")
    parser.add_argument("sweep_flags", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    from experiments import sweep

    sweep.run_trial = run_trial
    if args.hold:
        device_env = sweep.device_env
        sweep.device_env = lambda gpus: {**device_env(gpus), HOLD_VARIABLE: args.hold}
    flags = args.sweep_flags[1:] if args.sweep_flags[:1] == ["--"] else args.sweep_flags
    return sweep.main(flags)


if __name__ == "__main__":
    sys.exit(main())
