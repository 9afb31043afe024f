"""How predictions are written: one row per sequence or window, CSV or JSON lines."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

#: The output formats.
FORMATS = ("csv", "jsonl")


def output_format(path: str | None, requested: str | None) -> str:
    """``requested``, else ``jsonl`` for an output file ending in ``.jsonl`` or ``.json``, else
    ``csv``."""
    if requested is not None:
        return requested
    if path is not None and pathlib.Path(path).suffix.lower() in (".jsonl", ".json"):
        return "jsonl"
    return "csv"


class PredictionWriter:
    """Writes one row per prediction: CSV (with a header) or JSON lines.

    Args:
        file: where to write.
        kind: ``'csv'`` or ``'jsonl'``.
        class_names: the classes, in the order of the probabilities.
        with_start: include ``start_step`` (windows cut from a series).
    """

    def __init__(self, file: TextIO, kind: str, class_names: Sequence[str], with_start: bool):
        self.file, self.kind, self.class_names, self.with_start = (
            file,
            kind,
            list(class_names),
            with_start,
        )
        if kind == "csv":
            columns = ["sequence", *(["start_step"] if with_start else []), "predicted"]
            columns += [f"p_{name}" for name in self.class_names]
            file.write(",".join(columns) + "\n")

    def write(self, sequence: int, probabilities: np.ndarray, start_step: int | None) -> None:
        """One row: the sequence's index, its first step, the predicted class, every class's
        probability (6 significant digits)."""
        predicted = self.class_names[int(np.argmax(probabilities))]
        shown = [f"{float(p):.6g}" for p in probabilities]
        if self.kind == "csv":
            fields = [str(sequence), *([str(start_step)] if self.with_start else []), predicted]
            self.file.write(",".join(fields + shown) + "\n")
            return
        row: dict[str, Any] = {"sequence": sequence}
        if self.with_start:
            row["start_step"] = start_step
        row["predicted"] = predicted
        row["probabilities"] = {
            name: float(text) for name, text in zip(self.class_names, shown, strict=True)
        }
        self.file.write(json.dumps(row) + "\n")
