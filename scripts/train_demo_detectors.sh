#!/usr/bin/env bash
# The demo's probe detectors, made with the product's own commands (what a user would run):
#   monitor probe train  -> artifacts/demo/probes/<concept>/ and detectors/<concept>_probe.yaml
#   monitor calibrate    -> every shipped threshold at 1% FPR on data/benign/calibration.jsonl
#   monitor eval         -> figures by family and plots on the held-out test splits (docs/detectors.md)
# The SAE-feature detector is chosen by scripts/select_demo_features.py. Data: data/build_datasets.py.
set -euo pipefail
cd "$(dirname "$0")/.."
MONITOR=${MONITOR:-.venv/bin/monitor}

train() {  # concept severity description aggregation-options...
  local concept=$1 severity=$2 description=$3
  shift 3
  "$MONITOR" probe train --data "data/concepts/$concept/train.jsonl" --concept "$concept" --benign data/benign/train.jsonl \
    --severity "$severity" --description "$description" --target-fpr 0.01 "$@" \
    --probe-dir "artifacts/demo/probes/$concept" --detector-file "detectors/${concept}_probe.yaml" \
    --detector-name "${concept//_/-}-probe"
}
# Aggregations: the winners per concept in scripts/probe_options.py (docs/detectors.md, "Probe options").
train pii critical "Personal data or secrets (emails, phone numbers, card numbers, API keys) in the prompt." \
  --aggregation ema_max --alpha 0.3
train prompt_injection critical "An attempt to override the model's instructions or jailbreak it." \
  --aggregation rolling_mean_max --window 16
train harmful_request warning "A request for clearly dangerous help." --aggregation rolling_mean_max --window 16

"$MONITOR" calibrate --detectors detectors --benign data/benign/calibration.jsonl --target-fpr 0.01
"$MONITOR" eval --detectors detectors --data data/eval/single-turn.jsonl data/eval/multi-turn.jsonl --report docs/eval
"$MONITOR" eval --detectors detectors --data data/eval/single-turn.jsonl data/eval/multi-turn.jsonl --json \
  > artifacts/demo/probes/eval.json
