#!/usr/bin/env bash
# Trains the runs of the README's results table (100 epochs; LARNN, BN-LSTM and Flax's LSTM; seeds
# 0, 1 and 2), copies each run's config.json, metrics.jsonl and report.json into results/uci_har/,
# and regenerates the README's tables. Resumable: run it again after an interruption.
# Usage: bash scripts/final_runs.sh [RUNS_DIR]      (default runs/final; checkpoints stay there)
#        MODELS="larnn" SEEDS="1 2" bash scripts/final_runs.sh    (a part, e.g. per machine)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-runs/final}"
for model in ${MODELS:-larnn bnlstm lstm}; do
  for seed in ${SEEDS:-0 1 2}; do
    name="$model-seed$seed"
    bash scripts/train.sh --model "$model" --seed "$seed" --epochs 100 --no-progress \
      --out "$runs/$name" --resume
    mkdir -p "results/uci_har/$name"
    cp "$runs/$name/config.json" "$runs/$name/metrics.jsonl" "$runs/$name/report.json" \
      "results/uci_har/$name/"
  done
done
.venv/bin/python -m experiments.results_table --write README.md
