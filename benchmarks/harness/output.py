"""What a benchmark script prints and writes: a table (:func:`format_table`), a JSON file with
the machine and the code measured (:func:`write_json`, :func:`write_partial_json` for a run that
may be stopped), and figures beside it (:func:`save_figure`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness.machine import code_version, describe_machine, machine_info

#: ``benchmarks/results/``, where every script writes its JSON and figures by default.
RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def write_json(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Writes ``payload`` (plus ``"machine"`` and the command line) as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": machine_info(),
        "code": code_version(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **payload,
    }
    path.write_text(json.dumps(document, indent=2, default=json_default) + "\n")
    return path


def write_partial_json(
    path: str | os.PathLike[str],
    benchmark: str,
    config: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
) -> Path:
    """Writes the rows measured so far, marked ``"complete": false``.

    A long run saves this after every point, so that a run stopped by a time limit keeps what
    it measured; the final :func:`write_json` replaces it.
    """
    payload = {"benchmark": benchmark, "complete": False, "config": config, "rows": list(rows)}
    return write_json(path, payload)


def json_default(value: Any) -> Any:
    """NumPy scalars and arrays as JSON values (``json.dumps``'s ``default``)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column: the row key, its header and how to format a value (``None``: blank)."""

    key: str
    header: str
    fmt: str = "{}"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A plain-text table, right-aligned, one line per row (a GitHub-markdown table)."""
    cells = [[column.header for column in columns]]
    for row in rows:
        cells.append(
            [
                "" if row.get(column.key) is None else column.fmt.format(row[column.key])
                for column in columns
            ]
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [
        "| " + " | ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def print_and_write(
    out: str | os.PathLike[str],
    payload: Mapping[str, Any],
    description: str,
    columns: Sequence[Column],
) -> None:
    """Prints the machine, ``description`` and the table of ``payload["rows"]``, then writes
    ``payload`` to ``out`` (:func:`write_json`)."""
    print(describe_machine(machine_info()))
    print(description)
    print(format_table(payload["rows"], columns))
    write_json(out, payload)


def default_out(script: str) -> str:
    """The default JSON path of a script: ``benchmarks/results/<script>.json``."""
    return str(RESULTS_DIR / f"{script}.json")


def save_figure(figure: Any, json_path: str | os.PathLike[str]) -> str:
    """Saves a matplotlib figure next to the JSON output (same name, ``.png``).

    Returns its path relative to the working directory.
    """
    path = Path(json_path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return os.path.relpath(path)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
