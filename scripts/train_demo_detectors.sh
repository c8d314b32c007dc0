#!/usr/bin/env bash
# The demo's probe detectors, made with the product's own commands (what a user would run):
#   monitor probe train  -> artifacts/demo/probes/<concept>/ and detectors/<concept>_probe.yaml
#   monitor eval         -> figures and plots on the held-out test splits (docs/detectors.md)
# The SAE-feature detector is chosen by scripts/select_demo_features.py.
set -euo pipefail
cd "$(dirname "$0")/.."
MONITOR=${MONITOR:-.venv/bin/monitor}

train() {  # concept severity description
  "$MONITOR" probe train --data "data/concepts/$1/train.jsonl" --concept "$1" --benign data/benign/train.jsonl \
    --severity "$2" --description "$3" --target-fpr 0.01 \
    --probe-dir "artifacts/demo/probes/$1" --detector-file "detectors/$1_probe.yaml" --detector-name "${1//_/-}-probe"
}
train pii critical "Personal data or secrets (emails, phone numbers, card numbers, API keys) in the prompt."
train prompt_injection critical "An attempt to override the model's instructions or jailbreak it."
train harmful_request warning "A request for clearly dangerous help."

tests=$(mktemp)
cat data/concepts/{pii,prompt_injection,harmful_request}/test.jsonl > "$tests"
"$MONITOR" eval --detectors detectors --data "$tests" --report docs/eval
"$MONITOR" eval --detectors detectors --data "$tests" --json > artifacts/demo/probes/eval.json
rm -f "$tests"
