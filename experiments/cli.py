"""What every command of the pipeline shares: its parser, its logging and its exit statuses.

A command (``python -m experiments.train``, ``.evaluate``, ``.predict``, ``.sweep``,
``.analyze_sweep``, ``.results_table``, ``.plot_positional_encoding``, ``experiments.data``) is a
module with ``build_parser()`` and ``main(argv) -> int``:

* its parser comes from :func:`command_parser`: ``prog`` is how it is run, the description the
  first paragraph of the module's docstring (the documentation's commands are parsed by it in
  ``tests/test_docs.py``);
* it logs through :func:`configure_logging`: warnings from everything, progress notes from
  ``experiments``;
* it returns :data:`OK`, :data:`FAILED` (the work failed: a training that diverged, data that is
  missing or corrupt) or :data:`USAGE` (bad arguments, an input file or a run folder that cannot
  be used: argparse's own status for its errors), after :func:`report_error` has said why in one
  line on standard error; a command stopped by Ctrl-C returns :data:`INTERRUPTED`, as a shell
  reports a process that SIGINT ended.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

#: Exit statuses of every command.
OK, FAILED, USAGE = 0, 1, 2
#: The exit status of a command stopped by Ctrl-C: 128 + SIGINT.
INTERRUPTED = 130


def command_parser(
    module: str, doc: str | None, *, epilog_from_doc: bool = False, **options: Any
) -> argparse.ArgumentParser:
    """The parser of ``python -m <module>``, described by the first paragraph of ``doc`` (the
    module's docstring); with ``epilog_from_doc``, ``--help`` ends with the docstring's paragraphs
    after its second, as written. ``options`` go to ``argparse.ArgumentParser``."""
    paragraphs = (doc or "").strip().split("\n\n")
    if epilog_from_doc:
        options = {
            "formatter_class": argparse.RawDescriptionHelpFormatter,
            "epilog": "\n\n".join(paragraphs[2:]),
            **options,
        }
    return argparse.ArgumentParser(prog=f"python -m {module}", description=paragraphs[0], **options)


def add_output_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--output FILE`` (required; ``what`` the file holds) and ``--overwrite``, for a command
    that replaces an existing output file only when asked
    (:func:`experiments.files.check_output_file`)."""
    parser.add_argument("--output", required=True, metavar="FILE", help=what)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --output if it exists already"
    )


def configure_logging() -> None:
    """Command-line logging: warnings from everything, progress notes from ``experiments``."""
    # force: importing Orbax already attached a bare handler to the root logger.
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("experiments").setLevel(logging.INFO)


def report_error(error: BaseException | str, status: int) -> int:
    """Prints ``error: <error>`` on standard error; returns the exit ``status``."""
    print(f"error: {error}", file=sys.stderr)
    return status
