#!/usr/bin/env bash
# The demo's probe detectors, made with the product's own commands (what a user would run):
#   monitor probe train  -> artifacts/demo/probes/<concept>/ and detectors/<concept>_probe.yaml
#   monitor calibrate    -> every shipped threshold at 1% FPR on data/benign/calibration.jsonl (page tier), and
#                           the probes' record tier at 5%
#   monitor eval         -> figures by family and plots on the held-out test splits (docs/detectors.md)
# The SAE-feature detector is chosen by scripts/select_demo_features.py. Data: data/build_datasets.py and
# data/harmful_categories.py; data/eval/harmful-apart.jsonl is written by hand and only ever evaluated on.
set -euo pipefail
cd "$(dirname "$0")/.."
MONITOR=${MONITOR:-.venv/bin/monitor}

train() {  # concept severity description options...
  local concept=$1 severity=$2 description=$3
  shift 3
  "$MONITOR" probe train --concept "$concept" --benign data/benign/train.jsonl \
    --severity "$severity" --description "$description" --target-fpr 0.01 "$@" \
    --probe-dir "artifacts/demo/probes/$concept" --detector-file "detectors/${concept}_probe.yaml" \
    --detector-name "${concept//_/-}-probe"
}
# Aggregations: the winners per concept in scripts/probe_options.py (docs/detectors.md, "Probe options").
train pii critical "Personal data or secrets (emails, phone numbers, card numbers, API keys) in the prompt." \
  --data data/concepts/pii/train.jsonl --aggregation ema_max --alpha 0.3
train prompt_injection critical "An attempt to override the model's instructions or jailbreak it." \
  --data data/concepts/prompt_injection/train.jsonl --aggregation rolling_mean_max --window 16
# Harmful requests: read where the model decides (the assistant header's last token), learnt from the template
# families and the categories data (scripts/harmful_levers.py measured the levers: docs/detectors.md).
train harmful_request warning "A request for clearly dangerous help." --aggregation last \
  --data data/concepts/harmful_request/train.jsonl data/concepts/harmful_request/categories-train.jsonl

"$MONITOR" calibrate --detectors detectors --benign data/benign/calibration.jsonl --target-fpr 0.01
# Two tiers for the probes, from the same set: record an incident at 5% FPR (nobody paged), page at 1%. The
# SAE-feature detector is `info` (recorded, never routed): one tier is all it needs.
for probe in detectors/*_probe.yaml; do
  "$MONITOR" calibrate --detectors "$probe" --benign data/benign/calibration.jsonl --target-fpr 0.01 --record-fpr 0.05
done
# The test splits by shape, the categories' held-out tasks, and the sets written apart (evaluated on, never trained on).
EVAL=(data/eval/single-turn.jsonl data/eval/multi-turn.jsonl data/concepts/harmful_request/categories-test.jsonl
      data/eval/harmful-apart.jsonl data/eval/pii-apart.jsonl data/eval/injection-apart.jsonl)
"$MONITOR" eval --detectors detectors --data "${EVAL[@]}" --report docs/eval
"$MONITOR" eval --detectors detectors --data "${EVAL[@]}" --json > artifacts/demo/probes/eval.json
