"""Classify new sequences with a trained run's model: from files, or from a live stream of samples.

    python -m experiments.predict --checkpoint runs/best --input new.npz --output predictions.csv
    python -m experiments.predict --checkpoint runs/best --input recording.csv --stride 64
    sensor | python -m experiments.predict --checkpoint runs/best --stream --stride 32
    python -m experiments.predict --exported har.larnn --input new.npz

The model is the run's selected epoch (or ``--step N``), and every input goes through the run's
own preprocessing: the channel standardisation fitted on its training rows, read from the run's
``preprocessing.json`` (:mod:`experiments.preprocessing`). With ``--exported FILE``, the model and
its preprocessing are those of a file written by ``python -m experiments.export``, run without
the run folder (:mod:`larnn_jax.exported`).

Inputs (``--input``):

* ``.npz``: an array ``X`` ``(N, T, C)`` of raw (unstandardised) sequences, optionally
  ``lengths`` ``(N,)`` (the valid steps of each sequence, the rest being padding) and ``y``
  ``(N,)`` (true classes: the summary then gives the accuracy); or, from a training-format
  file, ``X_test`` with ``y_test``.
* anything else: text, one time step per line with one value per channel, separated by commas
  (CSV) or by white space. Blank lines and lines starting with ``#`` are skipped, and so is a
  first line without any number (a header). The rows are cut into windows of the run's length
  ``T`` every ``--stride`` steps.

Output (``--output FILE``, else standard output): one row per sequence, CSV (``sequence``,
``start_step`` for windows cut from text, ``predicted`` and ``p_<class>`` for every class) or JSON
lines (``--format jsonl``, or an output file ending in ``.jsonl``/``.json``). A summary (JSON)
goes to standard output, or to standard error when the predictions do.

``--stream``: reads one time step per line from standard input, as a sensor sends them, and
prints a prediction every ``--stride`` steps, each of the last ``T`` steps: the windows the model
was trained on (see :class:`experiments.prediction.StreamPredictor`). A bad line is reported on standard error with its
line number and skipped. At the end of the input (or at Ctrl-C, or when the reader of the
predictions goes away), a summary with the latency per sample goes to standard error.

Exit status: 0 success, 2 a usage or input error (bad input file or line, unusable run folder,
checkpoint or exported file), 1 the run's dataset could not be loaded where it is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

import numpy as np

from experiments import cli
from experiments.checkpoints import CheckpointError
from experiments.config import ConfigError
from experiments.data import DataError
from experiments.files import OutputPathError, check_output_file, write_text_atomically
from experiments.prediction.inputs import STDIN, InputError, read_input, time_steps
from experiments.prediction.predictor import ExportedPredictor, Predictor
from experiments.prediction.writers import FORMATS, PredictionWriter, output_format
from experiments.preprocessing import PreprocessingError
from experiments.restore import add_checkpoint_arguments
from larnn_jax.exported import ExportFormatError
from larnn_jax.inference import InputRangeError


def classify_file(
    predictor: Predictor | ExportedPredictor, path: pathlib.Path, stride: int, kind: str
) -> tuple[str, dict[str, Any]]:
    """Classifies every sequence of the input file ``path``; returns the predictions in
    ``kind`` and the summary."""
    started = time.perf_counter()
    sequences = read_input(path, predictor.preprocessing, stride)
    try:
        probabilities = predictor.predict(sequences.x, sequences.lengths)
    except InputRangeError as err:  # the network's sums overflow: no NaN counted as a class
        raise InputError(f"{path}: {sequences.name_value(err.index)} {err.problem}") from None
    text = io.StringIO()
    writer = PredictionWriter(text, kind, predictor.class_names, sequences.starts is not None)
    for index, row in enumerate(probabilities):
        start = None if sequences.starts is None else int(sequences.starts[index])
        writer.write(index, row, start)
    predicted = probabilities.argmax(axis=-1)
    counts = np.bincount(predicted, minlength=len(predictor.class_names))
    summary: dict[str, Any] = {
        **predictor.origin,
        "input": str(path),
        "sequences": len(probabilities),
    }
    if sequences.starts is not None and sequences.time_steps is not None:  # windows of text
        covered = int(sequences.starts[-1]) + predictor.window_length
        summary["windows"] = {
            "length": predictor.window_length,
            "stride": stride,
            "time_steps": sequences.time_steps,
            "time_steps_after_the_last_window": sequences.time_steps - covered,
        }
    summary["predicted"] = dict(zip(predictor.class_names, map(int, counts), strict=True))
    if sequences.labels is not None:
        summary["accuracy"] = float(np.mean(predicted == sequences.labels))
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return text.getvalue(), summary


def run_stream(
    predictor: Predictor | ExportedPredictor,
    lines: Iterable[str | bytes],
    stride: int,
    out: TextIO,
    err: TextIO,
    kind: str,
) -> dict[str, Any]:
    """Classifies the stream ``lines`` (one time step each) as ``--stream`` does: predictions to
    ``out`` as they come, bad lines reported to ``err`` and skipped. Returns the summary."""
    stream = predictor.stream(stride)
    writer = PredictionWriter(out, kind, predictor.class_names, with_start=True)
    out.flush()
    skipped = predictions = 0
    stopped = None
    try:
        for number, values in time_steps(lines, predictor.preprocessing, STDIN):
            if isinstance(values, InputError):
                skipped += 1
                print(f"error: {values}; skipped", file=err, flush=True)
                continue
            try:
                prediction = stream.push(values)
            except InputRangeError as error:  # the network's sums overflow
                skipped += 1
                (channel,) = error.index
                value = f"value {channel + 1}, {error.value!s}, {error.problem}"
                print(f"error: {STDIN}: line {number}: {value}; skipped", file=err, flush=True)
                continue
            if prediction is not None:
                writer.write(prediction.window, prediction.probabilities, prediction.start_step)
                out.flush()
                predictions += 1
    except KeyboardInterrupt:  # Ctrl-C ends a live stream: still say what it did
        stopped = "interrupted"
    except BrokenPipeError:  # the reader of the predictions went away (e.g. `| head`)
        stopped = "output closed"
    summary = {
        **predictor.origin,
        "window": predictor.window_length,
        "stride": stride,
        "samples": stream.samples,
        "skipped_lines": skipped,
        "predictions": predictions,
        "latency_per_sample": stream.latency_summary(),
    }
    if stopped is not None:
        summary["stopped"] = stopped
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = cli.command_parser("experiments.predict", __doc__, epilog_from_doc=True)
    # --data-dir: for runs without preprocessing.json.
    add_checkpoint_arguments(parser, "use", required=False)
    parser.add_argument(
        "--exported",
        metavar="FILE",
        help="use the model of a file written by experiments.export instead of --checkpoint",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="FILE", help=".npz, or text/CSV (see below)")
    source.add_argument(
        "--stream", action="store_true", help="read one time step per line from standard input"
    )
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="where the predictions go (default: standard output)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="csv or jsonl (default: jsonl for an --output ending in .jsonl or .json, else csv)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        metavar="N",
        help="time steps between the windows cut from text or a stream (default: half the "
        "run's window length T, as UCI HAR's windows overlap)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, 1 or 2: see the module's doc)."""
    cli.configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stride is not None and args.stride < 1:
        parser.error(f"--stride must be >= 1, got {args.stride}")
    if (args.checkpoint is None) == (args.exported is None):
        parser.error("give either --checkpoint (a run) or --exported (an exported model)")
    if args.exported is not None and (args.step is not None or args.data_dir is not None):
        parser.error("--step and --data-dir choose a run's checkpoint: not with --exported")
    kind = output_format(args.output, args.format)
    try:
        if args.output is not None:
            check_output_file(
                args.output, inputs=[path for path in (args.input, args.exported) if path]
            )
    except OutputPathError as err:
        return cli.report_error(f"--output {err}", cli.USAGE)
    try:
        predictor: Predictor | ExportedPredictor = (
            ExportedPredictor(args.exported)
            if args.exported is not None
            else Predictor.from_run(args.checkpoint, step=args.step, data_dir=args.data_dir)
        )
        stride = args.stride or max(1, predictor.window_length // 2)
        if args.stream:
            return _stream(predictor, stride, kind, args.output)
        text, summary = classify_file(predictor, pathlib.Path(args.input), stride, kind)
    except (InputError, CheckpointError, PreprocessingError, ConfigError, ExportFormatError) as err:
        return cli.report_error(err, cli.USAGE)
    except DataError as err:
        return cli.report_error(err, cli.FAILED)
    if args.output is None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error
            _discard_stdout()
        print(json.dumps(summary, indent=2), file=sys.stderr)
    else:
        write_text_atomically(args.output, text)
        print(json.dumps({**summary, "output": args.output}, indent=2))
    return cli.OK


def _stream(
    predictor: Predictor | ExportedPredictor, stride: int, kind: str, output: str | None
) -> int:
    """``--stream``: standard input to ``output`` (or standard output) until the input ends."""
    # Bytes, decoded line by line: a byte that is not UTF-8 spoils its line only, whatever the
    # decoding of sys.stdin (PYTHONIOENCODING, the locale).
    lines = iter(sys.stdin.buffer.readline, b"")
    with open(output, "w") if output else contextlib.nullcontext(sys.stdout) as out:
        summary = run_stream(predictor, lines, stride, out, sys.stderr, kind)
    if summary.get("stopped") == "output closed" and output is None:
        _discard_stdout()
    print(json.dumps(summary, indent=2), file=sys.stderr)
    return cli.INTERRUPTED if summary.get("stopped") == "interrupted" else cli.OK


def _discard_stdout() -> None:
    """Points standard output at the null device, so that nothing written to the closed pipe
    (not even Python's flush at exit) raises again."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


if __name__ == "__main__":
    sys.exit(main())
