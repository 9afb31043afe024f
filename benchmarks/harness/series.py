"""Series over a size (the sequence length, the window): one measurement per (point, model),
each model stopping at a memory or time budget (:func:`measure_series`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from benchmarks.harness.memory_use import GIB, device_peak_bytes
from benchmarks.harness.timing import interleaved_timings, summarize
from benchmarks.harness.workloads import TrainingBench


def measure_series(
    points: Sequence[int],
    models: Sequence[str],
    make_bench: Callable[[str, int], TrainingBench],
    *,
    repeats: int,
    warmup: int,
    memory_budget: int | None,
    time_budget_s: float | None,
    log: Callable[[str], None] = print,
    after_point: Callable[[list[dict[str, Any]]], object] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Times a training step of every model at every point, interleaving the models per point.

    A model's series stops at the first point where the compiled memory analysis exceeds
    ``memory_budget`` (that point is not run), where compiling or running fails (for example
    out of memory), or after the first point whose median step exceeds ``time_budget_s``.
    ``after_point`` is called with the rows so far after every measured point (to save partial
    results of a run that may be stopped).

    Returns:
      One row per measured (point, model): ``point``, ``model``, the :func:`summarize` fields,
      ``compile_s``, ``memory`` (:func:`memory_analysis`) and, on devices that report it,
      ``device_peak_bytes`` (the process's peak so far, so with points in increasing order it is
      the peak of that point); and ``{model: why its series stopped}``.
    """
    rows: list[dict[str, Any]] = []
    stopped: dict[str, str] = {}
    for point in points:
        benches: dict[str, TrainingBench] = {}
        for model in models:
            if model in stopped:
                continue
            try:
                bench = make_bench(model, point)
            except (jax.errors.JaxRuntimeError, MemoryError) as error:  # e.g. out of memory
                stopped[model] = f"failed to compile at {point}: {type(error).__name__}"
                continue
            needed = bench.memory["total_bytes"]
            if memory_budget is not None and needed is not None and needed > memory_budget:
                stopped[model] = (
                    f"stopped at {point}: needs {needed / GIB:.2f} GiB > budget "
                    f"{memory_budget / GIB:.2f} GiB"
                )
                log(f"  {model} @ {point}: {stopped[model]}")
                continue
            benches[model] = bench
        if not benches:  # every series has stopped
            break
        try:
            samples = interleaved_timings(benches, repeats=repeats, warmup=warmup)
        except (jax.errors.JaxRuntimeError, MemoryError) as error:
            for model in benches:
                stopped[model] = f"failed to run at {point}: {type(error).__name__}"
            continue
        for model, bench in benches.items():
            row: dict[str, Any] = {
                "point": point,
                "model": model,
                **summarize(samples[model]),
                "compile_s": bench.compile_seconds,
                "memory": bench.memory,
                "device_peak_bytes": device_peak_bytes(),
                **bench.usage_summary(),
            }
            rows.append(row)
            log(
                f"  {model} @ {point}: {row['median_s'] * 1e3:.1f} ms/step, "
                f"{(bench.memory['total_bytes'] or 0) / GIB:.2f} GiB"
            )
            if time_budget_s is not None and row["median_s"] > time_budget_s:
                stopped[model] = (
                    f"stopped after {point}: {row['median_s']:.1f} s/step > time budget "
                    f"{time_budget_s:.0f} s"
                )
        if after_point is not None:
            after_point(rows)
    return rows, stopped
