#!/usr/bin/env bash
# Creates .venv (if absent) and installs larnn_jax with the extras given as arguments.
# Usage: bash scripts/setup.sh [extras]     e.g. bash scripts/setup.sh train,tune,dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train,tune}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
