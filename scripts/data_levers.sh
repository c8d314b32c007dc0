#!/usr/bin/env bash
# Data levers for a probe, measured beside the shipped one: each candidate is trained the way the shipped probe is
# (scripts/train_demo_detectors.sh) plus extra training files, in a scratch folder, calibrated at both tiers on the
# same set, and judged by `monitor eval`; the script prints the probe's figures by family for each. Nothing shipped
# changes. About three minutes per concept with the rows cached. Figures: docs/detectors.md.
#
#   scripts/data_levers.sh pii                # identifiers of things, with their twins, and with records of
#                                             # several identifiers (data/pii_things.py)
#   scripts/data_levers.sh prompt_injection   # documents with benign instructions and their injected twins
#                                             # (data/injection_documents.py)
set -euo pipefail
cd "$(dirname "$0")/.."
MONITOR=${MONITOR:-.venv/bin/monitor}
PYTHON=${PYTHON:-.venv/bin/python}
CONCEPT=${1:?usage: scripts/data_levers.sh pii|prompt_injection}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
EVAL=(data/eval/single-turn.jsonl data/eval/multi-turn.jsonl)
case "$CONCEPT" in
  pii)
    "$PYTHON" data/pii_things.py
    "$PYTHON" data/pii_things.py --twins
    "$PYTHON" data/pii_things.py --records
    # The demo's requests, labelled for pii: its flagged ones must keep firing (`demo` in the table).
    "$PYTHON" -c 'import json
for line in open("deploy/local/demo-requests.jsonl"):
    d = json.loads(line)
    print(json.dumps({"messages": d["messages"], "labels": {"pii": int("pii-probe" in d["expect"])}, "source": "demo/" + d["name"]}))' \
      > "$OUT/demo.jsonl"
    DETECTOR=pii-probe
    OPTIONS=(--severity critical --aggregation ema_max --alpha 0.3
             --description "Personal data or secrets (emails, phone numbers, card numbers, API keys) in the prompt.")
    EVAL+=(data/eval/pii-apart.jsonl data/concepts/pii/things-test.jsonl data/concepts/pii/things-twins-test.jsonl
           data/concepts/pii/things-records-test.jsonl "$OUT/demo.jsonl")
    LEVERS=("+ identifiers of things|data/concepts/pii/things-train.jsonl"
            "+ things and their twins|data/concepts/pii/things-train.jsonl data/concepts/pii/things-twins-train.jsonl"
            "+ things, twins and records|data/concepts/pii/things-train.jsonl data/concepts/pii/things-twins-train.jsonl data/concepts/pii/things-records-train.jsonl")
    ;;
  prompt_injection)
    "$PYTHON" data/injection_documents.py
    DETECTOR=prompt-injection-probe
    OPTIONS=(--severity critical --aggregation rolling_mean_max --window 16
             --description "An attempt to override the model's instructions or jailbreak it.")
    EVAL+=(data/eval/injection-apart.jsonl data/concepts/prompt_injection/documents-test.jsonl)
    LEVERS=("+ documents and their injected twins|data/concepts/prompt_injection/documents-train.jsonl"
            "the same over layers 10 + 15 + 20|data/concepts/prompt_injection/documents-train.jsonl|10 15 20")
    ;;
  *) echo "unknown concept: $CONCEPT (pii or prompt_injection)" >&2; exit 2 ;;
esac
FILE=detectors/${CONCEPT}_probe.yaml
"$MONITOR" eval --detectors detectors --data "${EVAL[@]}" --json > "$OUT/0.json"
LABELS=("shipped")

k=0
for lever in "${LEVERS[@]}"; do
  k=$((k + 1))
  IFS='|' read -r label files layers <<< "$lever"  # label | extra training files | layers (default 15)
  read -r -a extra <<< "$files"
  read -r -a layers <<< "${layers:-15}"
  dir="$OUT/$k"
  mkdir -p "$dir/detectors"
  cp detectors/*.yaml "$dir/detectors/"
  taps=$(printf '  - layer: %s\\n' "${layers[@]}")
  sed -e "s#\.\./\.\./artifacts/demo/probes/$CONCEPT\$#$dir/$CONCEPT#" -e "s#\.\./\.\./#$PWD/#" \
    -e "s#^  - $PWD/detectors\$#  - $dir/detectors#" -e "s#^  - layer: 15\$#${taps%\\n}#" \
    deploy/local/monitor.yaml > "$dir/monitor.yaml"
  "$MONITOR" probe train --concept "$CONCEPT" --benign data/benign/train.jsonl --target-fpr 0.01 "${OPTIONS[@]}" \
    --layer "${layers[@]}" \
    --data "data/concepts/$CONCEPT/train.jsonl" "${extra[@]}" \
    --probe-dir "$dir/$CONCEPT" --detector-file "$dir/$FILE" --detector-name "$DETECTOR"
  "$MONITOR" calibrate --config "$dir/monitor.yaml" --detectors "$dir/$FILE" \
    --benign data/benign/calibration.jsonl --target-fpr 0.01 --record-fpr 0.05
  "$MONITOR" eval --config "$dir/monitor.yaml" --detectors "$dir/detectors" --data "${EVAL[@]}" --json > "$OUT/$k.json"
  LABELS+=("$label")
done

"$PYTHON" - "$DETECTOR" "$OUT" "${LABELS[@]}" <<'PY'
import json, sys
detector, out, labels = sys.argv[1], sys.argv[2], sys.argv[3:]
rec = lambda x: "-" if x["recall"] is None else f"{x['recall']:.2f}"
fpr = lambda x: "-" if x["fpr"] is None else f"{100 * x['fpr']:.1f}%"
print("\n| probe | thresholds (page / record) | family | AUROC | page: recall / FPR | record: recall / FPR |")
print("|---|---|---|---|---|---|")
for k, label in enumerate(labels):
    r = json.load(open(f"{out}/{k}.json"))[detector]
    for f in r["families"]:
        t = {x["tier"]: x for x in f["tiers"]}
        auroc = "-" if f["auroc"] is None else f"{f['auroc']:.3f}"
        print(f"| {label} | {t['page']['threshold']:.3f} / {t['record']['threshold']:.3f} | {f['family']} | {auroc} | "
              f"{rec(t['page'])} / {fpr(t['page'])} | {rec(t['record'])} / {fpr(t['record'])} |")
PY
