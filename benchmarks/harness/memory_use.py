"""Memory: XLA's compiled memory analysis (:func:`memory_analysis`, deterministic), the device's
peak bytes where the backend reports them, this process's peak resident set size, and the budget
a series of measurements stays within (:func:`memory_budget_bytes`).
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import jax

GIB = 1024**3


def memory_analysis(compiled: Any) -> dict[str, int | None]:
    """XLA's memory analysis of a compiled function, in bytes.

    ``total_bytes = argument + output + temp - alias``: what the function needs at its peak,
    deterministic and independent of what else the process holds. ``None`` where the backend
    gives no analysis.
    """
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {"total_bytes": None}
    sizes = {
        "argument_bytes": analysis.argument_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
        "temp_bytes": analysis.temp_size_in_bytes,
        "alias_bytes": analysis.alias_size_in_bytes,
        "generated_code_bytes": analysis.generated_code_size_in_bytes,
    }
    sizes["total_bytes"] = (
        sizes["argument_bytes"] + sizes["output_bytes"] + sizes["temp_bytes"] - sizes["alias_bytes"]
    )
    return sizes


def device_peak_bytes() -> int | None:
    """The device's peak bytes in use so far in this process (GPU), ``None`` where not reported."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def available_memory_bytes() -> int | None:
    """Memory the OS could give this process now (``MemAvailable``), where it says."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_budget_bytes(budget_gb: float | None) -> int | None:
    """``budget_gb`` in bytes; by default 80 % of the memory available now (``None``: no limit)."""
    if budget_gb is not None:
        return int(budget_gb * GIB)
    available = available_memory_bytes()
    return None if available is None else int(0.8 * available)
