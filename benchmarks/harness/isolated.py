"""A function run in a fresh Python process, for the peak memory of that alone
(:func:`run_in_subprocess`); this module is the child's entry point.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness.memory_use import device_peak_bytes, peak_rss_bytes
from benchmarks.harness.output import json_default

_CHILD_MARK = "BENCHMARK-CHILD-RESULT "


def run_in_subprocess(target: str, kwargs: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    """Calls ``module:function(**kwargs)`` in a fresh Python process; adds its peak memory.

    The function returns a JSON-serialisable dict; the result gets ``peak_rss_bytes`` (the
    child's peak resident set size, which includes the Python interpreter, JAX and the compiler)
    and ``device_peak_bytes``. On failure (an exception, killed for memory, past ``timeout_s``),
    the result is ``{"error": ...}``.
    """
    command = [
        sys.executable,
        "-m",
        "benchmarks.harness.isolated",
        target,
        json.dumps(dict(kwargs)),
    ]
    root = Path(__file__).resolve().parents[2]  # the repository, where `benchmarks` imports
    try:
        done = subprocess.run(
            command, cwd=root, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_CHILD_MARK):
            return json.loads(line[len(_CHILD_MARK) :])
    reason = f"exit status {done.returncode}"
    if done.returncode < 0:
        reason = f"killed by signal {-done.returncode} (out of memory?)"
    tail = done.stderr.strip().splitlines()[-3:]
    return {"error": reason + (": " + " / ".join(tail) if tail else "")}


def _child_main(argv: Sequence[str]) -> None:
    """Entry point of :func:`run_in_subprocess`'s child: ``target`` ``kwargs-json``."""
    target, kwargs = argv
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = dict(function(**json.loads(kwargs)))
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["device_peak_bytes"] = device_peak_bytes()
    print(_CHILD_MARK + json.dumps(result, default=json_default), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
