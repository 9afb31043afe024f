"""Training-step time and memory of LARNN against the window size k: cached versus naive cell.

The classifier of docs/model.md §3 (``--num-layers`` LARNN layers, residual stacking) at ``T = 128``, for
``k = 1, 2, 4, …, 128``, with :class:`larnn_jax.LARNNCell` (``larnn``: entries projected once,
normalisation folded into the query and output, docs/model.md §2) and with
:class:`larnn_jax.reference.ReferenceLARNNCell` (``larnn_naive``: every step re-projects and
re-normalises the whole window). Both run the same step (forward, backward, Adam) on the same
batch, timed in turns at each ``k``; a series stops at the memory or time budget.

    python -m benchmarks.scaling_window
    python -m benchmarks.scaling_window --batch 16 --windows 1,4,16 --repeats 2
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from benchmarks.harness.arguments import (
    add_run_arguments,
    add_subset_argument,
    add_workload_arguments,
    doubling,
    int_list,
    workload_from_args,
)
from benchmarks.harness.machine import describe_machine, machine_info
from benchmarks.harness.memory_use import GIB, memory_budget_bytes
from benchmarks.harness.output import (
    Column,
    format_table,
    pyplot,
    save_figure,
    write_json,
    write_partial_json,
)
from benchmarks.harness.series import measure_series
from benchmarks.harness.workloads import TrainingBench

MODELS = ("larnn", "larnn_naive")


def plot(rows: list[dict[str, Any]], out: str) -> str:
    """Time and memory of a training step against ``k`` (log-log, base 2), one curve per cell."""
    plt = pyplot()
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in MODELS:
        mine = [row for row in rows if row["model"] == model]
        if not mine:
            continue
        windows = [row["point"] for row in mine]
        time_axis.loglog(windows, [r["median_s"] for r in mine], "o-", base=2, label=model)
        memory_axis.loglog(
            windows, [r["memory"]["total_bytes"] / GIB for r in mine], "o-", base=2, label=model
        )
    for axis, title in (
        (time_axis, "training step (s)"),
        (memory_axis, "compiled peak memory of the step (GiB)"),
    ):
        axis.set_xlabel("window size k")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    path = save_figure(figure, out)
    plt.close(figure)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints the table and returns (and writes) the JSON payload."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser, skip=("window_size",), batch=64)
    parser.add_argument("--windows", type=int_list, default=doubling(1, 128))
    parser.add_argument("--time-budget-s", type=float, default=60.0, help="stop above this")
    add_subset_argument(parser, "--models", MODELS)
    add_run_arguments(parser, "scaling_window", repeats=3)
    args = parser.parse_args(argv)
    budget = memory_budget_bytes(args.memory_budget_gb)

    def make_bench(model: str, window_size: int) -> TrainingBench:
        return TrainingBench.of(workload_from_args(args, model, window_size=window_size))

    rows, stopped = measure_series(
        args.windows,
        args.models,
        make_bench,
        repeats=args.repeats,
        warmup=args.warmup,
        memory_budget=budget,
        time_budget_s=args.time_budget_s,
        after_point=lambda so_far: write_partial_json(
            args.out, "scaling_window", vars(args), so_far
        ),
    )
    by_window: dict[int, dict[str, Any]] = {}
    for row in rows:
        entry = by_window.setdefault(row["point"], {"k": row["point"]})
        entry[f"{row['model']}_ms"] = row["median_s"] * 1e3
        entry[f"{row['model']}_gib"] = row["memory"]["total_bytes"] / GIB
        entry[f"{row['model']}_cpu_s"] = row.get("cpu_user_s", 0.0) + row.get("cpu_sys_s", 0.0)
    for entry in by_window.values():
        if "larnn_naive_ms" in entry and "larnn_ms" in entry:
            entry["speedup"] = entry["larnn_naive_ms"] / entry["larnn_ms"]
            if entry["larnn_cpu_s"]:
                entry["cpu_speedup"] = entry["larnn_naive_cpu_s"] / entry["larnn_cpu_s"]
    figure = plot(rows, args.out)
    payload: dict[str, Any] = {
        "benchmark": "scaling_window",
        "complete": True,
        "config": vars(args),
        "memory_budget_bytes": budget,
        "rows": rows,
        "table": list(by_window.values()),
        "stopped": stopped,
        "figure": figure,
    }

    print(describe_machine(machine_info()))
    print(
        f"batch {args.batch}, T={args.steps}, H={args.features}, heads {args.num_heads}, "
        f"{args.num_layers} layers; median of {args.repeats}; budgets {(budget or 0) / GIB:.1f} GiB, "
        f"{args.time_budget_s:.0f} s"
    )
    print(
        format_table(
            payload["table"],
            [
                Column("k", "k"),
                Column("larnn_ms", "cached ms/step", "{:.0f}"),
                Column("larnn_naive_ms", "naive ms/step", "{:.0f}"),
                Column("speedup", "naive/cached", "{:.2f}"),
                Column("cpu_speedup", "CPU-time naive/cached", "{:.2f}"),
                Column("larnn_gib", "cached GiB", "{:.2f}"),
                Column("larnn_naive_gib", "naive GiB", "{:.2f}"),
            ],
        )
    )
    for model, reason in stopped.items():
        print(f"{model}: {reason}")
    write_json(args.out, payload)
    print(f"figure: {figure}")
    return payload


if __name__ == "__main__":
    main()
