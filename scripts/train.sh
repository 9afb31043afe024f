#!/usr/bin/env bash
# Sets up the environment and trains the paper's best LARNN on UCI HAR.
# Extra arguments go to `python -m experiments.train`, e.g. `bash scripts/train.sh --epochs 10`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh tune
exec .venv/bin/python -m experiments.train "$@"
