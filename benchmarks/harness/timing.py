"""Timing: warm-up, then the compared functions interleaved repeat by repeat
(:func:`interleaved_timings`), summarised by their median (:func:`summarize`); and the time a
compilation takes (:func:`timed_compile`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np


def interleaved_timings(
    functions: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in turns so that load drifts hit all alike.

    Each function is called ``warmup`` times first (untimed). Then, ``repeats`` times, every
    function is called once, in an order rotated by one at each repeat. Each function must block
    until its result is ready.
    """
    names = list(functions)
    for name in names:
        for _ in range(warmup):
            functions[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            functions[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, minimum, 99th percentile and count of timing samples (seconds)."""
    values = np.asarray(samples, dtype=np.float64)
    return {
        "median_s": float(np.median(values)),
        "min_s": float(values.min()),
        "p99_s": float(np.percentile(values, 99)),
        "repeats": len(values),
    }


def timed_compile(function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``function`` jitted (unless it is already, with its own options such as donation),
    lowered and compiled for ``args``; returns it and the seconds taken."""
    start = time.perf_counter()
    jitted = function if hasattr(function, "lower") else jax.jit(function)
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start
