"""What a result was measured on: the machine (:func:`machine_info`, without the host's name)
and the code (:func:`code_version`).
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
import optax

from benchmarks.harness.memory_use import GIB


def _cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_bytes() -> int | None:
    """Physical memory of the machine, where the OS reports it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """What a result was measured on, without the host's name."""
    device = jax.devices()[0]
    return {
        "platform": platform.platform(terse=True),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": _total_memory_bytes(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        # Other processes on the machine: 1-, 5- and 15-minute load averages when measured.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        # glibc's malloc settings (e.g. glibc.malloc.hugetlb=1), which change XLA:CPU's page faults.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        # A preloaded allocator (e.g. tcmalloc) replaces malloc altogether.
        "ld_preload": os.environ.get("LD_PRELOAD"),
    }


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line for the top of a printed table."""
    memory = info.get("memory_bytes")
    memory_text = f", {memory / GIB:.0f} GiB RAM" if memory else ""
    load = info.get("load_average")
    load_text = f"; load average {load[0]:.1f}" if load else ""
    return (
        f"{info['cpu_model']}, {info['cpu_cores']} cores{memory_text}; {info['platform']}; "
        f"jax {info['jax']} ({info['backend']}: {info['device_kind']}), flax {info['flax']}"
        f"{load_text}"
    )


def code_version() -> dict[str, Any]:
    """The commit measured and whether the library (``larnn_jax/``) differed from it."""
    import larnn_jax

    root = Path(larnn_jax.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--", "larnn_jax")
    return {
        "commit": git("rev-parse", "HEAD"),
        "library_uncommitted_changes": None if status is None else bool(status),
    }
