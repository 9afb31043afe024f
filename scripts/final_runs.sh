#!/usr/bin/env bash
# Trains the runs of the final results table (LARNN, BN-LSTM and Flax's LSTM; seeds 0, 1 and 2; the
# same recipe for all, by default the recommended one, docs/recipe.md), each twice, for the two
# honest figures: NAME = MODEL-RECIPE-seedS holds out 4 validation subjects and its test figure is
# that of the epoch selected on them; NAME = MODEL-RECIPE-all21-seedS trains on all 21 training
# subjects and its test figure is that of the last epoch. Copies each run's config.json,
# metrics.jsonl and report.json into results/uci_har/NAME/ and regenerates the tables of
# docs/results.md and the README.
# Resumable: run it again after an interruption.
# Usage: bash scripts/final_runs.sh [RUNS_DIR]      (default runs/final; checkpoints stay there)
#   MODELS="larnn" SEEDS="1 2"   a part of the table (e.g. per machine)
#   FIGURES="all21"              one of the two figures: "val" (selected on validation subjects)
#                                or "all21" (final epoch on all 21); default both
#   RECIPE=paper                 another recipe of experiments.train (default recommended)
#   PARALLEL=N                   N runs at a time (default 1; on a GPU one run's step is a chain of
#                                small kernels that leaves most of the card idle, BENCHMARKS.md §7).
#                                Each run's output goes to RUNS_DIR/NAME.log
#   PYTHON=python3               an interpreter that has the dependencies already, instead of
#                                scripts/train.sh's virtual environment (a machine without internet)
#   EPOCHS=N                     fewer epochs, to check the script (its results are not the table's)
#   TRAIN_ARGS="--l2 0.001"      more flags for every run, after the recipe's (they override it)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-runs/final}"
parallel="${PARALLEL:-1}"
recipe_name="${RECIPE:-recommended}"
recipe=(--recipe "$recipe_name" ${EPOCHS:+--epochs "$EPOCHS"})
mkdir -p "$runs"
if [ -n "${PYTHON:-}" ]; then
  train=("$PYTHON" -m experiments.train)
  table=("$PYTHON" -m experiments.results_table)
else
  bash scripts/setup.sh train,tune
  export LARNN_SKIP_SETUP=1  # not once per run: parallel runs would install at the same time
  train=(bash scripts/train.sh)
  table=(.venv/bin/python -m experiments.results_table)
fi
if [ "$parallel" -gt 1 ]; then
  # Each process takes GPU memory as it needs it instead of most of the card.
  export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
fi

train_and_collect() {  # NAME FLAGS...; leaves RUNS_DIR/NAME.failed if the run fails
  local name="$1"
  shift
  rm -f "$runs/$name.failed"
  local resume=()  # continue a run that an interruption stopped
  [ ! -f "$runs/$name/config.json" ] || resume=(--resume)
  echo "$name: training (log: $runs/$name.log)"
  # shellcheck disable=SC2086  # TRAIN_ARGS is split into flags on purpose
  if "${train[@]}" "$@" "${recipe[@]}" --no-progress ${TRAIN_ARGS:-} --out "$runs/$name" \
    "${resume[@]}" >>"$runs/$name.log" 2>&1 &&
    mkdir -p "results/uci_har/$name" &&
    cp "$runs/$name/config.json" "$runs/$name/metrics.jsonl" "$runs/$name/report.json" \
      "results/uci_har/$name/"; then
    echo "$name: done"
  else
    touch "$runs/$name.failed"
    echo "$name: FAILED (see $runs/$name.log)" >&2
  fi
}

names=()
for model in ${MODELS:-larnn bnlstm lstm}; do
  for seed in ${SEEDS:-0 1 2}; do
    for figure in ${FIGURES:-val all21}; do
      case "$figure" in
        val) name="$model-$recipe_name-seed$seed" flags=() ;;
        all21) name="$model-$recipe_name-all21-seed$seed" flags=(--validation-subjects 0) ;;
        *) echo "unknown figure $figure (val or all21)" >&2; exit 2 ;;
      esac
      names+=("$name")
      train_and_collect "$name" --model "$model" --seed "$seed" "${flags[@]}" &
      while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do
        wait -n || true
      done
    done
  done
done
wait
"${table[@]}" --write docs/results.md README.md
failed=0
for name in "${names[@]}"; do
  [ -e "$runs/$name.failed" ] && failed=$((failed + 1))
done
if [ "$failed" -gt 0 ]; then
  echo "$failed run(s) failed: see their logs in $runs" >&2
  exit 1
fi
