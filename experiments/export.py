"""Export a trained run's classifier as one file that JAX and NumPy alone can run.

    python -m experiments.export --checkpoint runs/best --output har.larnn
    python -m experiments.export --checkpoint runs/best --step 12 --output har-epoch12.larnn

The file (:mod:`larnn_jax.exported`) holds the classifier of the run's selected epoch (or
``--step N``) in evaluation mode as ``jax.export`` serialisations (any batch size, any sequence
length) and its one-step function for streams, with the run's standardisation, class names and
window length, the run's configuration, and the SHA-256 of the checkpoint's manifest (which
lists the SHA-256 of every file of the checkpoint). Load it with ``larnn_jax.exported.load``, or
classify with ``python -m experiments.predict --exported FILE``.

An existing --output is replaced only with --overwrite; the file is written whole or not at all.

Exit status: 0 success, 2 a usage error (an unusable run folder or checkpoint, an --output that
cannot be written), 1 the run's dataset could not be loaded where it is needed (a run saved
without preprocessing.json).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from experiments import cli
from experiments.checkpoints import MANIFEST_NAME, CheckpointError
from experiments.config import ConfigError
from experiments.data import DataError
from experiments.files import OutputPathError, atomic_write, check_output_file, sha256_file
from experiments.prediction.predictor import Predictor
from experiments.preprocessing import PreprocessingError
from experiments.restore import add_checkpoint_arguments
from larnn_jax.exported import export_classifier


def export_run(predictor: Predictor, output: pathlib.Path) -> dict[str, Any]:
    """Writes ``predictor``'s model to ``output`` (:func:`larnn_jax.exported.export_classifier`),
    recording where it comes from; returns the file's metadata."""
    preprocessing = predictor.preprocessing
    source = {
        "dataset": preprocessing.dataset,
        "run": str(predictor.checkpoint_dir.parent.parent),
        "epoch": predictor.epoch,
        "checkpoint": str(predictor.checkpoint_dir),
        "checkpoint_sha256": sha256_file(predictor.checkpoint_dir / MANIFEST_NAME),
        "config": predictor.config.to_dict(),
        "preprocessing": preprocessing.to_dict(),
    }
    with atomic_write(output, "wb") as file:
        return export_classifier(
            file,
            predictor.model,
            predictor.variables,
            window_length=preprocessing.steps,
            channels=preprocessing.channels,
            class_names=preprocessing.class_names,
            channel_mean=preprocessing.channel_mean,
            channel_std=preprocessing.channel_std,
            batch_size=predictor.config.batch_size,
            source=source,
        )


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = cli.command_parser("experiments.export", __doc__, epilog_from_doc=True)
    add_checkpoint_arguments(parser, "export")
    cli.add_output_arguments(parser, "the file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, 1 or 2: see the module's doc)."""
    cli.configure_logging()
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        output = check_output_file(args.output, overwrite=args.overwrite)
    except OutputPathError as err:
        return cli.report_error(f"--output {err}", cli.USAGE)
    try:
        predictor = Predictor.from_run(args.checkpoint, step=args.step, data_dir=args.data_dir)
        metadata = export_run(predictor, output)
    except (CheckpointError, PreprocessingError, ConfigError) as err:
        return cli.report_error(err, cli.USAGE)
    except DataError as err:
        return cli.report_error(err, cli.FAILED)
    source = metadata["source"]
    summary = {
        "output": str(output),
        "bytes": output.stat().st_size,
        "checkpoint": source["checkpoint"],
        "epoch": source["epoch"],
        "checkpoint_sha256": source["checkpoint_sha256"],
        "format_version": metadata["format_version"],
        "platforms": metadata["platforms"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    print(json.dumps(summary, indent=2))
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
