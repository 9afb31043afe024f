"""The command-line flags the benchmark scripts share: a workload's sizes, the repeats and the
output, a subset of the models, lists of sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from benchmarks.harness.output import default_out
from benchmarks.harness.workloads import PAPER, Workload

#: :class:`Workload`'s sizes as flags: field, short form, type, help. The fields are the
#: training's (:class:`~experiments.config.TrainConfig`), which are the cell's; the short forms
#: are those of the training's command line.
WORKLOAD_FLAGS: tuple[tuple[str, str | None, type, str], ...] = (
    ("batch", None, int, "sequences per batch"),
    ("steps", None, int, "time steps T per sequence"),
    ("inputs", None, int, "input features per step"),
    ("classes", None, int, "classes of the classifier"),
    ("features", "--hidden", int, "hidden size H"),
    ("num_heads", "--heads", int, "attention heads"),
    ("window_size", "--window", int, "LARNN window size k"),
    ("num_layers", "--layers", int, "stacked recurrent layers (residual stacking)"),
    ("dropout_rate", "--dropout", float, "dropout on each layer's output h"),
)


def add_workload_arguments(
    parser: argparse.ArgumentParser, skip: Sequence[str] = (), **defaults: Any
) -> None:
    """Flags for :class:`Workload`'s sizes but ``skip`` (defaults: the paper's or ``defaults``):
    ``--features`` for field ``features``, and so on, with the short forms of
    :data:`WORKLOAD_FLAGS`."""
    values = {**PAPER, **defaults}
    for name, short, kind, help_text in WORKLOAD_FLAGS:
        if name not in skip:
            flags = [f"--{name.replace('_', '-')}", *([short] if short else [])]
            parser.add_argument(*flags, type=kind, default=values[name], help=help_text)


def add_run_arguments(
    parser: argparse.ArgumentParser,
    script: str,
    repeats: int,
    warmup: int = 1,
    memory_budget: bool = True,
) -> None:
    """``--repeats``, ``--warmup``, ``--out`` and (with ``memory_budget``) ``--memory-budget-gb``."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed calls per function")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls first")
    if memory_budget:
        parser.add_argument(
            "--memory-budget-gb",
            type=float,
            default=None,
            help="skip what the compiled memory analysis says needs more (default: 80%% of "
            "the memory available at the start)",
        )
    parser.add_argument("--out", default=default_out(script), help="JSON output path")


def workload_from_args(args: argparse.Namespace, block: str, **overrides: Any) -> Workload:
    """The :class:`Workload` of the parsed flags for ``block``."""
    sizes = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(Workload)
        if hasattr(args, field.name) and field.name != "block"
    }
    return Workload(block=block, **{**sizes, **overrides})


def add_subset_argument(parser: argparse.ArgumentParser, flag: str, choices: Sequence[str]) -> None:
    """Adds ``flag`` (e.g. ``--models``): a comma-separated subset of ``choices`` (default: all),
    parsed into a list; an unknown or empty subset is a usage error that names it."""
    what = flag.lstrip("-")

    def subset(text: str) -> list[str]:
        chosen = [item for item in text.split(",") if item]
        unknown = sorted(set(chosen) - set(choices))
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"unknown or no {what} in {text!r}; choose from {','.join(choices)}"
            )
        return chosen

    parser.add_argument(
        flag,
        type=subset,
        default=list(choices),
        help=f"comma-separated subset of {','.join(choices)} (default: all)",
    )


def int_list(text: str) -> list[int]:
    """``'1,2,4'`` → ``[1, 2, 4]`` (an argparse type)."""
    return [int(item) for item in text.split(",") if item]


def doubling(first: int, last: int) -> str:
    """``'first,2·first,…,last'`` as an argparse default."""
    values = [first]
    while values[-1] * 2 <= last:
        values.append(values[-1] * 2)
    return ",".join(str(v) for v in values)
