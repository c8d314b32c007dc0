#!/usr/bin/env bash
# A lever measured for the pii probe: identifiers of things (VINs, MAC addresses, containers, lots, CVEs,
# ISINs... data/pii_things.py) as training negatives, alone and with their twins (the same frames carrying a
# person's identifier, as positives). Trains each candidate the way the shipped probe is trained
# (scripts/train_demo_detectors.sh) plus those families, in a scratch folder, calibrates both tiers on the same
# set, and prints pii-probe's figures by family beside the shipped probe's. Nothing shipped changes.
# About 3 minutes with the rows cached. Figures: docs/detectors.md, "Personal data: identifiers of things".
set -euo pipefail
cd "$(dirname "$0")/.."
MONITOR=${MONITOR:-.venv/bin/monitor}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
"$PYTHON" data/pii_things.py
"$PYTHON" data/pii_things.py --twins
EVAL=(data/eval/single-turn.jsonl data/eval/multi-turn.jsonl data/eval/pii-apart.jsonl
      data/concepts/pii/things-test.jsonl data/concepts/pii/things-twins-test.jsonl)
"$MONITOR" eval --detectors detectors --data "${EVAL[@]}" --json > "$OUT/shipped.json"

candidate() {  # name, extra training files...
  local name=$1 dir="$OUT/$1"
  shift
  mkdir -p "$dir/detectors"
  cp detectors/*.yaml "$dir/detectors/"
  sed -e "s#\.\./\.\./artifacts/demo/probes/pii\$#$dir/pii#" -e "s#\.\./\.\./#$PWD/#" \
    -e "s#^  - $PWD/detectors\$#  - $dir/detectors#" deploy/local/monitor.yaml > "$dir/monitor.yaml"
  "$MONITOR" probe train --concept pii --benign data/benign/train.jsonl --severity critical \
    --description "Personal data or secrets (emails, phone numbers, card numbers, API keys) in the prompt." \
    --target-fpr 0.01 --aggregation ema_max --alpha 0.3 --data data/concepts/pii/train.jsonl "$@" \
    --probe-dir "$dir/pii" --detector-file "$dir/detectors/pii_probe.yaml" --detector-name pii-probe
  "$MONITOR" calibrate --config "$dir/monitor.yaml" --detectors "$dir/detectors/pii_probe.yaml" \
    --benign data/benign/calibration.jsonl --target-fpr 0.01 --record-fpr 0.05
  "$MONITOR" eval --config "$dir/monitor.yaml" --detectors "$dir/detectors" --data "${EVAL[@]}" --json > "$OUT/$name.json"
}
candidate things data/concepts/pii/things-train.jsonl
candidate twins data/concepts/pii/things-train.jsonl data/concepts/pii/things-twins-train.jsonl

"$PYTHON" - "$OUT/shipped.json" "$OUT/things.json" "$OUT/twins.json" <<'PY'
import json, sys
print("\n| probe | threshold (page / record) | family | AUROC | page: recall / FPR | record: recall / FPR |")
print("|---|---|---|---|---|---|")
for label, path in zip(("shipped", "+ identifiers of things", "+ things and their twins"), sys.argv[1:]):
    r = json.load(open(path))["pii-probe"]
    for f in r["families"]:
        t = {x["tier"]: x for x in f["tiers"]}
        rec = lambda x: "-" if x["recall"] is None else f"{x['recall']:.2f}"
        fpr = lambda x: "-" if x["fpr"] is None else f"{100 * x['fpr']:.1f}%"
        auroc = "-" if f["auroc"] is None else f"{f['auroc']:.3f}"
        print(f"| {label} | {t['page']['threshold']:.3f} / {t['record']['threshold']:.3f} | {f['family']} | {auroc} | "
              f"{rec(t['page'])} / {fpr(t['page'])} | {rec(t['record'])} / {fpr(t['record'])} |")
PY
