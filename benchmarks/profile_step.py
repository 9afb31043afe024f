"""Where a training step's time goes: XLA's own per-operation trace, grouped by kind.

Runs the training's step (:class:`benchmarks.harness.workloads.TrainingBench`) of each chosen model under
``jax.profiler`` with XLA:CPU's per-operation trace events on
(``--xla_cpu_enable_xprof_traceme``, which this script sets before JAX starts), then adds up the
events of XLA's worker threads by operation kind: the fusion or operation name without its
number (``ynn_fusion`` are the matrix products XLA hands to its XNNPACK-based library,
``while`` the scans' loops, ``*dynamic-update-slice*`` writes into buffers, ``copy`` copies).
Durations are summed over threads, so they add up to more than the wall time on several cores;
the shares are what to read. Tracing itself slows the many small operations of a recurrent step,
so the step takes longer here than in ``throughput.py``.

Where LARNN runs the native step (``scan='auto'`` with the native library available), its two
calls per layer are single ``ffi_call`` events in XLA's trace; the native step's own sections
(:data:`larnn_jax.native.PROFILE_SECTIONS`: thread CPU time summed over a call's threads, with
``LARNN_JAX_NATIVE_PROFILE=1``, which this script also sets) say where their time goes.

    python -m benchmarks.profile_step        # LARNN (default, XLA fused) and Flax's LSTM, paper sizes
    python -m benchmarks.profile_step --models larnn,larnn_plain --top 15
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()
os.environ["LARNN_JAX_NATIVE_PROFILE"] = "1"

import argparse
import collections
import pathlib
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import jax

from benchmarks.harness.arguments import (
    add_run_arguments,
    add_subset_argument,
    add_workload_arguments,
    workload_from_args,
)
from benchmarks.harness.output import Column, format_table, print_and_write
from benchmarks.harness.workloads import BLOCKS, TrainingBench
from larnn_jax import native

#: Trace events that are XLA's bookkeeping around the operations, not operations.
_BOOKKEEPING = re.compile(r"^(ThunkExecutor|SlinkyThreadPool)")


def operation_kinds(trace_dir: pathlib.Path) -> tuple[dict[str, float], dict[str, int]]:
    """Total seconds and count of each operation kind in the XLA threads of a trace."""
    (path,) = sorted(trace_dir.glob("**/*.xplane.pb"))[-1:]
    profile = jax.profiler.ProfileData.from_file(str(path))
    seconds: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # XLA:CPU's worker threads
                continue
            for event in line.events:
                if _BOOKKEEPING.match(event.name):
                    continue
                kind = re.sub(r"\.\d+$", "", event.name)
                seconds[kind] += event.duration_ns * 1e-9
                counts[kind] += 1
    return seconds, counts


def profile(bench: TrainingBench, steps: int, warmup: int, top: int) -> dict[str, Any]:
    """Traces ``steps`` training steps after ``warmup`` untraced ones; returns the ``top`` kinds
    by time, per step."""
    for _ in range(warmup):
        bench()
    profiling_native = native.available()
    if profiling_native:
        native.read_profile()  # resets the sections
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(steps):
                bench()
        seconds, counts = operation_kinds(pathlib.Path(folder))
    sections = native.read_profile() if profiling_native else {}
    native_total = sum(sections.values())
    total = sum(seconds.values())
    kinds = [
        {
            "kind": kind,
            "seconds_per_step": value / steps,
            "share": value / total,
            "events_per_step": counts[kind] / steps,
        }
        for kind, value in sorted(seconds.items(), key=lambda item: -item[1])[:top]
    ]
    native_sections = [
        {"section": name, "seconds_per_step": value / steps, "share": value / native_total}
        for name, value in sorted(sections.items(), key=lambda item: -item[1])
        if native_total > 0
    ]
    return {
        "thread_seconds_per_step": total / steps,
        "kinds": kinds,
        "native_thread_seconds_per_step": native_total / steps,
        "native_sections": native_sections,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0]
    )
    add_workload_arguments(parser)
    add_run_arguments(parser, "profile_step", repeats=2, warmup=1, memory_budget=False)
    add_subset_argument(parser, "--models", BLOCKS)
    parser.set_defaults(models=["larnn", "larnn_fused", "lstm"])
    parser.add_argument("--top", type=int, default=12, help="operation kinds listed per model")
    args = parser.parse_args(argv)
    rows, native_rows = [], []
    payload: dict[str, Any] = {"benchmark": "profile_step", "config": vars(args), "models": {}}
    for block in args.models:
        workload = workload_from_args(args, block)
        result = profile(TrainingBench.of(workload), args.repeats, args.warmup, args.top)
        payload["models"][block] = result
        for kind in result["kinds"]:
            rows.append({"model": block, **kind, "share": 100 * kind["share"]})
        for section in result["native_sections"]:
            native_rows.append({"model": block, **section, "share": 100 * section["share"]})
    payload["rows"] = rows
    payload["native_rows"] = native_rows
    print_and_write(
        args.out,
        payload,
        f"training step, batch {args.batch}, T={args.steps}, {args.num_layers} layers; XLA:CPU "
        f"operations by kind, thread time summed over {args.repeats} traced steps",
        [
            Column("model", "model"),
            Column("kind", "operation kind"),
            Column("seconds_per_step", "thread s/step", "{:.3f}"),
            Column("share", "share %", "{:.1f}"),
            Column("events_per_step", "events/step", "{:.0f}"),
        ],
    )
    if native_rows:
        print(
            format_table(
                native_rows,
                [
                    Column("model", "model"),
                    Column("section", "native step section"),
                    Column("seconds_per_step", "thread s/step", "{:.3f}"),
                    Column("share", "share %", "{:.1f}"),
                ],
            )
        )
    return payload


if __name__ == "__main__":
    main()
