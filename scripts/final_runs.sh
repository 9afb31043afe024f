#!/usr/bin/env bash
# Trains the final runs of docs/results.md (LARNN, BN-LSTM and Flax's LSTM; seeds 0, 1 and 2;
# the recipe chosen on validation: 25 epochs, the learning rate halved every 5), copies each run's
# config.json, metrics.jsonl and report.json into results/uci_har/, and regenerates the tables of
# docs/results.md and the README. Resumable: run it again after an interruption.
# Usage: bash scripts/final_runs.sh [RUNS_DIR]      (default runs/final; checkpoints stay there)
#   MODELS="larnn" SEEDS="1 2"   a part of the table (e.g. per machine)
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
recipe=(--epochs "${EPOCHS:-25}" --decay-every 5 --decay-factor 0.5)
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

train_and_collect() {  # MODEL SEED; leaves RUNS_DIR/NAME.failed if the run fails
  local name="$1-seed$2"
  rm -f "$runs/$name.failed"
  echo "$name: training (log: $runs/$name.log)"
  if "${train[@]}" --model "$1" --seed "$2" "${recipe[@]}" --no-progress \
    ${TRAIN_ARGS:-} --out "$runs/$name" --resume >>"$runs/$name.log" 2>&1 &&
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
    names+=("$model-seed$seed")
    train_and_collect "$model" "$seed" &
    while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do
      wait -n || true
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
