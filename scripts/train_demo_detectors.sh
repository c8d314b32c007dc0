#!/usr/bin/env bash
# The demo's probe detectors, made with the product's own commands (what a user would run):
#   monitor probe train  -> artifacts/demo/probes/<concept>/ and detectors/<concept>_probe.yaml
#   monitor calibrate    -> every shipped threshold at 1% FPR on data/benign/calibration.jsonl
#   monitor eval         -> figures by family and plots on the held-out test splits (docs/detectors.md)
# The SAE-feature detector is chosen by scripts/select_demo_features.py. Data: data/build_datasets.py.
set -euo pipefail
cd "$(dirname "$0")/.."
MONITOR=${MONITOR:-.venv/bin/monitor}
AGGREGATION=${AGGREGATION:-rolling_mean_max}  # the winner in scripts/probe_options.py (docs/detectors.md)
WINDOW=${WINDOW:-16}

train() {  # concept severity description
  "$MONITOR" probe train --data "data/concepts/$1/train.jsonl" --concept "$1" --benign data/benign/train.jsonl \
    --severity "$2" --description "$3" --target-fpr 0.01 --aggregation "$AGGREGATION" --window "$WINDOW" \
    --probe-dir "artifacts/demo/probes/$1" --detector-file "detectors/$1_probe.yaml" --detector-name "${1//_/-}-probe"
}
train pii critical "Personal data or secrets (emails, phone numbers, card numbers, API keys) in the prompt."
train prompt_injection critical "An attempt to override the model's instructions or jailbreak it."
train harmful_request warning "A request for clearly dangerous help."

"$MONITOR" calibrate --detectors detectors --benign data/benign/calibration.jsonl --target-fpr 0.01
"$MONITOR" eval --detectors detectors --data data/eval/single-turn.jsonl data/eval/multi-turn.jsonl --report docs/eval
"$MONITOR" eval --detectors detectors --data data/eval/single-turn.jsonl data/eval/multi-turn.jsonl --json \
  > artifacts/demo/probes/eval.json
