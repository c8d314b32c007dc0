#!/usr/bin/env bash
# A lever measured for the pii probe: identifiers of things (VINs, MAC addresses, containers, lots, CVEs,
# ISINs... data/pii_things.py) as training negatives. Trains a candidate the way the shipped probe is trained
# (scripts/train_demo_detectors.sh) plus those families, in a scratch folder, calibrates both tiers on the same
# set, and prints pii-probe's figures by family beside the shipped probe's. Nothing shipped changes.
# About 2 minutes with the rows cached. Figures: docs/detectors.md, "Personal data: identifiers of things".
set -euo pipefail
cd "$(dirname "$0")/.."
MONITOR=${MONITOR:-.venv/bin/monitor}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
"$PYTHON" data/pii_things.py
EVAL=(data/eval/single-turn.jsonl data/eval/multi-turn.jsonl data/eval/pii-apart.jsonl
      data/concepts/pii/things-test.jsonl)
"$MONITOR" eval --detectors detectors --data "${EVAL[@]}" --json > "$OUT/shipped.json"

mkdir -p "$OUT/detectors"
cp detectors/*.yaml "$OUT/detectors/"
sed -e "s#\.\./\.\./artifacts/demo/probes/pii\$#$OUT/pii#" -e "s#\.\./\.\./#$PWD/#" -e "s#^  - $PWD/detectors\$#  - $OUT/detectors#" \
  deploy/local/monitor.yaml > "$OUT/monitor.yaml"
"$MONITOR" probe train --concept pii --benign data/benign/train.jsonl --severity critical \
  --description "Personal data or secrets (emails, phone numbers, card numbers, API keys) in the prompt." \
  --target-fpr 0.01 --aggregation ema_max --alpha 0.3 \
  --data data/concepts/pii/train.jsonl data/concepts/pii/things-train.jsonl \
  --probe-dir "$OUT/pii" --detector-file "$OUT/detectors/pii_probe.yaml" --detector-name pii-probe
"$MONITOR" calibrate --config "$OUT/monitor.yaml" --detectors "$OUT/detectors/pii_probe.yaml" \
  --benign data/benign/calibration.jsonl --target-fpr 0.01 --record-fpr 0.05
"$MONITOR" eval --config "$OUT/monitor.yaml" --detectors "$OUT/detectors" --data "${EVAL[@]}" --json > "$OUT/things.json"

"$PYTHON" - "$OUT/shipped.json" "$OUT/things.json" <<'PY'
import json, sys
print("\n| probe | threshold (page / record) | family | AUROC | page: recall / FPR | record: recall / FPR |")
print("|---|---|---|---|---|---|")
for label, path in zip(("shipped", "+ identifiers of things"), sys.argv[1:]):
    r = json.load(open(path))["pii-probe"]
    for f in r["families"]:
        t = {x["tier"]: x for x in f["tiers"]}
        rec = lambda x: "-" if x["recall"] is None else f"{x['recall']:.2f}"
        auroc = "-" if f["auroc"] is None else f"{f['auroc']:.3f}"
        print(f"| {label} | {t['page']['threshold']:.3f} / {t['record']['threshold']:.3f} | {f['family']} | {auroc} | "
              f"{rec(t['page'])} / {100 * t['page']['fpr']:.1f}% | {rec(t['record'])} / {100 * t['record']['fpr']:.1f}% |")
PY
