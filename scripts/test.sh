#!/usr/bin/env bash
# Sets up the environment, checks lint, formatting and the types (of the library, the pipeline and
# the benchmarks), and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh train,tune,dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # the files and settings of setup.cfg's [mypy] section
.venv/bin/python -m pytest -n 2 "$@"
