#!/usr/bin/env bash
# The screening of the training recipe's parts (docs/recipe.md): every named variant below,
# trained with seeds 0, 1 and 2 (three draws of the 4 validation subjects), one run at a time,
# on the BN-LSTM (the LARNN cell without attention: the same norms and gates, 5-7x cheaper).
# Every run keeps a moving average of its weights (--ema-decay 0.98), so that each run gives the
# raw and the averaged weights' accuracies. Resumable: run it again after an interruption.
# Usage: bash scripts/screen.sh RUNS_DIR [NAME...]      (default: every variant, in order)
#   MODEL=larnn          another model (default bnlstm)
#   SEEDS="0 1"          other seeds (default 0 1 2)
#   RESULTS=DIR          where each finished run's config.json, metrics.jsonl and report.json
#                        are copied (default results/uci_har/screen)
#   PYTHON=python3       the interpreter (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:?usage: bash scripts/screen.sh RUNS_DIR [NAME...]}"
shift
results="${RESULTS:-results/uci_har/screen}"
python="${PYTHON:-.venv/bin/python}"
# The recipe so far: 25 epochs, the learning rate halved every 5.
common=(--model "${MODEL:-bnlstm}" --epochs 25 --decay-every 5 --decay-factor 0.5
  --ema-decay 0.98 --no-progress)
declare -A variants=(
  [baseline]=""
  [rotation-x180]="--rotation-about-x-degrees 180"
  [rotation-any20]="--rotation-degrees 20"
  [warp02]="--time-warp-sigma 0.2"
  # The other parts: against the reference while none was kept, then on top of label smoothing.
  [scale01]="--scaling-sigma 0.1"
  [ls01]="--label-smoothing 0.1"
  [ls01-gamma01]="--label-smoothing 0.1 --norm-scale-init 0.1"
  [ls01-cosine]="--label-smoothing 0.1 --schedule cosine"
  # Full turns about x for LAYING alone: lying on any side, without the tilt of the postures.
  [ls01-laying-x180]="--label-smoothing 0.1 --rotation-about-x-degrees 180 --rotation-classes LAYING"
)
order=(baseline rotation-x180 rotation-any20 warp02 scale01 ls01 ls01-gamma01 ls01-cosine ls01-laying-x180)
names=("$@")
[ "${#names[@]}" -gt 0 ] || names=("${order[@]}")
for name in "${names[@]}"; do
  [ -n "${variants[$name]+set}" ] || { echo "unknown variant $name; known: ${order[*]}" >&2; exit 2; }
done
mkdir -p "$runs" "$results"
for name in "${names[@]}"; do
  for seed in ${SEEDS:-0 1 2}; do
    run="$name-seed$seed"
    resume=()  # continue a run that an interruption stopped
    [ ! -f "$runs/$run/config.json" ] || resume=(--resume)
    echo "$(date -Is) $run: training (log: $runs/$run.log)"
    # shellcheck disable=SC2086  # a variant's flags are split into words on purpose
    "$python" -m experiments.train "${common[@]}" ${variants[$name]} --seed "$seed" \
      --out "$runs/$run" "${resume[@]}" >>"$runs/$run.log" 2>&1
    mkdir -p "$results/$run"
    cp "$runs/$run/config.json" "$runs/$run/metrics.jsonl" "$runs/$run/report.json" "$results/$run/"
    echo "$(date -Is) $run: done"
  done
done
