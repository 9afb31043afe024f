"""Latency of one cell step at batch 1: real-time inference on a sensor stream.

Each cell's step ``(variables, carry, x_t) -> (carry, h_t)`` is jit-compiled once and called on
one sample at a time, the carry fed back as a stream would, in evaluation mode: with
``norm='batch'`` the running statistics are used, with ``norm='layer'`` there are none. Every
call is timed on its own (dispatch from Python included: what a real-time loop pays), the cells
in turns, one call each; the table gives the median and the 99th percentile.

For comparison, ``in-scan`` is the cost per step with ``--scan-steps`` steps inside one compiled
scan (no per-step dispatch): what the step computes, without the call overhead.

Cells, as the training builds them (:meth:`experiments.config.TrainConfig.build_cell`, the
paper's configuration but for the sizes and norm given): ``larnn`` (:class:`larnn_jax.LARNNCell`),
``larnn_naive`` (:class:`larnn_jax.reference.ReferenceLARNNCell`), ``bnlstm``
(:class:`larnn_jax.BNLSTMCell`), ``lstm`` (Flax's ``nn.LSTMCell``, no normalisation). The
in-scan run scans each with the library's default (``scan='auto'``). The input has ``--inputs`` features (default
the hidden size: what a stacked layer sees after the input projection).

    python -m benchmarks.streaming
    python -m benchmarks.streaming --calls 500
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

from benchmarks.harness.arguments import (
    add_run_arguments,
    add_subset_argument,
    add_workload_arguments,
)
from benchmarks.harness.output import Column, print_and_write
from benchmarks.harness.timing import interleaved_timings, summarize
from benchmarks.harness.workloads import PAPER
from experiments.config import TrainConfig
from larnn_jax import LARNNLayer
from larnn_jax.normalization import NormKind
from larnn_jax.reference import ReferenceLARNNCell

# (name, norm) of every measured cell; norm None: the cell has no normalisation.
CELLS: tuple[tuple[str, NormKind | None], ...] = (
    ("larnn", "batch"),
    ("larnn", "layer"),
    ("larnn_naive", "batch"),
    ("bnlstm", "batch"),
    ("bnlstm", "layer"),
    ("lstm", None),
)


def make_cell(name: str, norm: NormKind | None, args: argparse.Namespace) -> nn.RNNCellBase:
    """The evaluation-mode cell ``name`` with normalisation ``norm`` (None: a cell without)."""
    config = TrainConfig(
        model=name.partition("_")[0],
        features=args.features,
        num_heads=args.num_heads,
        window_size=args.window_size,
    )
    if norm is not None:
        config = dataclasses.replace(config, norm=norm)
    cell = config.build_cell()
    return ReferenceLARNNCell.twin(cell) if name == "larnn_naive" else cell


class StreamStep:
    """One cell on a stream of batch-1 inputs: each call runs one compiled step, waited for."""

    def __init__(self, cell: nn.RNNCellBase, inputs: int, seed: int = 0):
        key_init, key_x = jax.random.split(jax.random.key(seed))
        self.x = jax.random.normal(key_x, (1, inputs))
        self.carry = cell.initialize_carry(key_init, self.x.shape)
        self.variables = cell.init(key_init, self.carry, self.x)
        self.step = jax.jit(cell.apply)

    def __call__(self) -> None:
        """Advances the stream by one step."""
        self.carry, h = self.step(self.variables, self.carry, self.x)
        jax.block_until_ready(h)


def scan_per_step(cell: nn.RNNCellBase, inputs: int, steps: int) -> Callable[[], None]:
    """A compiled scan of ``cell`` over ``(1, steps, inputs)`` (evaluation mode), to be timed."""
    layer = LARNNLayer(cell)
    x = jax.random.normal(jax.random.key(1), (1, steps, inputs))
    variables = layer.init(jax.random.key(0), x, deterministic=True)
    run = jax.jit(lambda variables, x: layer.apply(variables, x, deterministic=True))
    return lambda: jax.block_until_ready(run(variables, x))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints the table and returns (and writes) the JSON payload."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(
        parser,
        skip=("batch", "steps", "classes", "num_layers", "dropout_rate"),
        inputs=PAPER["features"],
    )
    parser.add_argument("--calls", type=int, default=3000, help="timed steps per cell")
    parser.add_argument("--scan-steps", type=int, default=1000, help="steps of the in-scan run")
    labels = [f"{name}/{norm}" if norm else name for name, norm in CELLS]
    add_subset_argument(parser, "--cells", labels)
    add_run_arguments(parser, "streaming", repeats=10, warmup=100, memory_budget=False)
    args = parser.parse_args(argv)

    selected = [
        (label, spec) for label, spec in zip(labels, CELLS, strict=True) if label in args.cells
    ]
    names = [label for label, _ in selected]
    cells = [make_cell(name, norm, args) for _, (name, norm) in selected]
    streams = {
        label: StreamStep(cell, args.inputs) for label, cell in zip(names, cells, strict=True)
    }
    step_samples = interleaved_timings(streams, repeats=args.calls, warmup=args.warmup)
    scans = {
        label: scan_per_step(cell, args.inputs, args.scan_steps)
        for label, cell in zip(names, cells, strict=True)
    }
    scan_samples = interleaved_timings(scans, repeats=args.repeats, warmup=1)

    rows = []
    for label in names:
        step = summarize(step_samples[label])
        rows.append(
            {
                "cell": label,
                "median_us": step["median_s"] * 1e6,
                "p99_us": step["p99_s"] * 1e6,
                "min_us": step["min_s"] * 1e6,
                "in_scan_us": summarize(scan_samples[label])["median_s"] * 1e6 / args.scan_steps,
                "calls": step["repeats"],
            }
        )
    payload = {"benchmark": "streaming", "config": vars(args), "rows": rows}

    print_and_write(
        args.out,
        payload,
        f"batch 1, D={args.inputs}, H={args.features}, heads {args.num_heads}, k={args.window_size}; "
        f"{args.calls} calls per cell, in turns; in-scan: {args.scan_steps} steps, median of "
        f"{args.repeats}",
        [
            Column("cell", "cell/norm"),
            Column("median_us", "median µs", "{:.1f}"),
            Column("p99_us", "p99 µs", "{:.1f}"),
            Column("min_us", "min µs", "{:.1f}"),
            Column("in_scan_us", "in-scan µs/step", "{:.1f}"),
        ],
    )
    return payload


if __name__ == "__main__":
    main()
