#!/usr/bin/env bash
# Sets up the environment and trains the paper's best LARNN on UCI HAR with the recommended
# recipe (docs/recipe.md; --recipe paper: the paper's training).
# Extra arguments go to `python -m experiments.train`, e.g. `bash scripts/train.sh --epochs 10`.
set -euo pipefail
cd "$(dirname "$0")/.."
# LARNN_SKIP_SETUP=1: the environment is set up already (scripts/final_runs.sh does it once).
[ -n "${LARNN_SKIP_SETUP:-}" ] || bash scripts/setup.sh train,tune
# tcmalloc reuses freed memory where glibc's malloc has the kernel fault in every page of every
# step's buffers again: a CPU training step takes 15–30 % less time (BENCHMARKS.md, sections 1
# and 6). Preloaded when the system has it and LD_PRELOAD is unset (set it, even empty, to
# choose).
tcmalloc="$(/sbin/ldconfig -p 2>/dev/null | awk '/libtcmalloc_minimal\.so\.4 /{print $NF; exit}' || true)"
if [ -n "$tcmalloc" ] && [ -z "${LD_PRELOAD+set}" ]; then
  echo "using tcmalloc: $tcmalloc" >&2
  export LD_PRELOAD="$tcmalloc"
fi
exec .venv/bin/python -m experiments.train "$@"
