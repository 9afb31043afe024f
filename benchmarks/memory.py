"""Peak memory of one training step on long sequences (default T = 4096, batch 32, paper widths).

For each model, the classifier of docs/model.md §3 (3 layers, residual stacking) and the training's own
step (forward, backward, optimiser update; :class:`benchmarks.harness.workloads.TrainingBench`):

* XLA's compiled memory analysis: arguments + outputs + temporaries (deterministic; no memory is
  allocated to get it);
* the peak resident set size of a fresh process that compiles the step and runs it once (the
  interpreter, JAX and the compiler included), and on a GPU the device's peak bytes in use. This
  run is skipped when the analysis says the step needs more than ``--rss-limit-gb``;
* bytes per sequence and the largest batch that fits the target, from a second analysis at
  batch 1 (the need is affine in the batch).

``larnn`` runs the library's default fused scan, ``larnn_plain`` the plain one (``nn.RNN`` over
the cell: every step's window is kept for the backward pass), ``larnn_remat`` rematerialised
training scans (``scan='remat'``, chunks of ``N`` steps, ``N`` the divisor of ``T`` nearest
``sqrt(T)`` unless ``--remat-chunk-length``).

The project's target: LARNN at T = 4096, batch 32, paper widths trains within 4 GB (10⁹ bytes;
all figures here are in GB).

    python -m benchmarks.memory
    python -m benchmarks.memory --models larnn --steps 1024 --no-rss
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax

from benchmarks.harness.arguments import (
    add_subset_argument,
    add_workload_arguments,
    workload_from_args,
)
from benchmarks.harness.isolated import run_in_subprocess
from benchmarks.harness.machine import describe_machine, machine_info
from benchmarks.harness.memory_use import memory_budget_bytes
from benchmarks.harness.output import Column, default_out, format_table, write_json
from benchmarks.harness.workloads import BLOCKS, TrainingBench, Workload

GB = 1e9
TARGET_GB = 4.0


def analysed_bytes(analysis: dict[str, int | None], key: str) -> int:
    """``analysis[key]``, from :func:`~benchmarks.harness.memory_use.memory_analysis`.

    Raises:
        RuntimeError: the backend gives no memory analysis, which this benchmark reports.
    """
    value = analysis.get(key)
    if value is None:
        raise RuntimeError(
            f"the {jax.default_backend()} backend gives no compiled memory analysis ({key}), "
            "which benchmarks.memory reports"
        )
    return value


def measure_training_step(**workload: Any) -> dict[str, Any]:
    """Compiles and runs one training step of ``Workload(**workload)`` (run in a fresh process).

    Returns the compiled memory analysis, the compile time and the time of the step.
    """
    bench = TrainingBench.of(Workload(**workload))
    start = time.perf_counter()
    bench()
    return {
        "memory": bench.memory,
        "compile_s": bench.compile_seconds,
        "step_s": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints the table and returns (and writes) the JSON payload."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser, steps=4096, batch=32)
    add_subset_argument(parser, "--models", BLOCKS)
    parser.add_argument("--remat-chunk-length", type=int, default=None, help="larnn_remat's N")
    parser.add_argument("--target-gb", type=float, default=TARGET_GB, help="memory target (GB)")
    parser.add_argument(
        "--rss", action=argparse.BooleanOptionalAction, default=True, help="run the RSS process"
    )
    parser.add_argument(
        "--rss-limit-gb",
        type=float,
        default=None,
        help="skip the RSS run when the analysis exceeds this (default: 80%% of available)",
    )
    parser.add_argument("--timeout-s", type=float, default=900.0, help="for the RSS process")
    parser.add_argument("--out", default=default_out("memory"), help="JSON output path")
    args = parser.parse_args(argv)
    models = args.models
    rss_limit = memory_budget_bytes(args.rss_limit_gb)
    target = args.target_gb * GB

    rows = []
    for model in models:
        workload = workload_from_args(args, model)
        analysis = TrainingBench.of(workload).memory
        single = TrainingBench.of(workload_from_args(args, model, batch=1)).memory
        total = analysed_bytes(analysis, "total_bytes")
        single_total = analysed_bytes(single, "total_bytes")
        per_sequence = (total - single_total) / max(args.batch - 1, 1)
        fixed = single_total - per_sequence
        arguments_and_outputs = analysed_bytes(analysis, "argument_bytes") + analysed_bytes(
            analysis, "output_bytes"
        )
        row: dict[str, Any] = {
            "model": model,
            "memory": analysis,
            "total_gb": total / GB,
            "temp_gb": analysed_bytes(analysis, "temp_bytes") / GB,
            "argument_output_gb": arguments_and_outputs / GB,
            "per_sequence_mb": per_sequence / 1e6,
            "max_batch_in_target": (
                max(int((target - fixed) // per_sequence), 0) if per_sequence > 0 else None
            ),
            "within_target": total <= target,
        }
        if not args.rss:
            row["rss_note"] = "not run (--no-rss)"
        elif rss_limit is not None and total > rss_limit:
            row["rss_note"] = (
                f"not run: the analysis says {total / GB:.1f} GB > limit {rss_limit / GB:.1f} GB"
            )
        else:
            child = run_in_subprocess(
                "benchmarks.memory:measure_training_step",
                dataclasses.asdict(workload),
                args.timeout_s,
            )
            row["child"] = child
            if "error" in child:
                row["rss_note"] = child["error"]
            else:
                row["peak_rss_gb"] = child["peak_rss_bytes"] / GB
                row["step_s"] = child["step_s"]
                if child.get("device_peak_bytes") is not None:
                    row["device_peak_gb"] = child["device_peak_bytes"] / GB
        rows.append(row)
        print(f"{model}: {row['total_gb']:.2f} GB (analysis)", flush=True)

    by_model = {row["model"]: row for row in rows}
    larnn, remat = by_model.get("larnn"), by_model.get("larnn_remat")
    payload = {
        "benchmark": "memory",
        "config": vars(args),
        "rows": rows,
        "target": {
            "gb": args.target_gb,
            "larnn_total_gb": None if larnn is None else larnn["total_gb"],
            "met": None if larnn is None else larnn["within_target"],
            "larnn_remat_total_gb": None if remat is None else remat["total_gb"],
            "met_with_remat": None if remat is None else remat["within_target"],
        },
    }
    print(describe_machine(machine_info()))
    print(
        f"training step, batch {args.batch}, T={args.steps}, D={args.inputs}, H={args.features}, "
        f"heads {args.num_heads}, k={args.window_size}, {args.num_layers} layers; GB = 1e9 bytes"
    )
    print(
        format_table(
            rows,
            [
                Column("model", "model"),
                Column("total_gb", "XLA total GB", "{:.2f}"),
                Column("temp_gb", "temp GB", "{:.2f}"),
                Column("argument_output_gb", "args+out GB", "{:.3f}"),
                Column("peak_rss_gb", "peak RSS GB", "{:.2f}"),
                Column("device_peak_gb", "device peak GB", "{:.2f}"),
                Column("step_s", "step s", "{:.1f}"),
                Column("per_sequence_mb", "MB/seq", "{:.1f}"),
                Column("max_batch_in_target", f"batch in {args.target_gb:g} GB"),
                Column("within_target", f"<= {args.target_gb:g} GB"),
            ],
        )
    )
    if "larnn_remat" in models:
        chunk = workload_from_args(args, "larnn_remat").chunk
        print(f"larnn_remat: scan='remat', remat_chunk_length={chunk}")
    for row in rows:
        if "rss_note" in row:
            print(f"{row['model']}: peak RSS {row['rss_note']}")
    for measured in (larnn, remat):
        if measured is not None:
            verdict = "met" if measured["within_target"] else "NOT met"
            print(
                f"target: {measured['model']} within {args.target_gb:g} GB: "
                f"{measured['total_gb']:.2f} GB, {verdict}"
            )
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
