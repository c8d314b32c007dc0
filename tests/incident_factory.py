"""Incident and alert events for a chat, made by the sidecar's own builders from a real tokenizer.

The scores are synthetic (a `pii` probe whose logit is high on tokens with digits or `@`, a max
aggregation), the rest is what the sidecar would send: the chat template's tokens, the
prompt/completion boundary, evidence, running scores, feature context. The console tests and
`bench/console.py` fill stores with these; the end-to-end test uses the real pipeline's incidents.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone

import numpy as np

from monitor.config.models import DetectorSpec
from monitor.detectors.trace import FeatureContext, Incident, TraceArrays
from monitor.detectors.updates import DetectorUpdate
from monitor.offline.rows import chat_token_ids
from monitor.sinks.events import EventBuilder, FeatureExplanations, rfc3339
from monitor.sinks.incidents import IncidentBuilder
from monitor.sinks.reply import ReplyReader

SPECS = {
    "pii-probe": DetectorSpec.model_validate({
        "name": "pii-probe", "concept": "pii", "description": "Personal data (emails, phone and card numbers) in the chat.",
        "inputs": [{"probe": "pii"}], "aggregation": {"kind": "max"}, "threshold": 0.5, "severity": "critical",
        "calibration": {"threshold": 0.5, "target_fpr": 0.01, "achieved_fpr": 0.008, "n_benign": 1200,
                        "fpr_upper_95": 0.013, "data": "benign.jsonl", "data_sha256": "ab" * 32}}),
    # Watched, not trusted: it would abort if it were live.
    "pii-shadow": DetectorSpec.model_validate({
        "name": "pii-shadow", "concept": "pii", "inputs": [{"probe": "pii"}], "aggregation": {"kind": "max"},
        "threshold": 0.5, "severity": "critical", "action": "abort", "mode": "shadow"}),
    # Warns on the request; pages when the model answered it.
    "pii-if-answered": DetectorSpec.model_validate({
        "name": "pii-if-answered", "concept": "pii", "inputs": [{"probe": "pii"}], "aggregation": {"kind": "max"},
        "threshold": 0.5, "severity": "warning", "severity_if_answered": "critical"}),
    "secrets-sae": DetectorSpec.model_validate({
        "name": "secrets-sae", "concept": "secrets", "inputs": [{"sae": "demo-l15", "feature": 1234}],
        "aggregation": {"kind": "max"}, "threshold": 2.0, "severity": "warning"}),
}
EXPLANATIONS = FeatureExplanations(by_input={"demo-l15/1234": "numbers that look like identifiers",
                                             "demo-l15/77": "email addresses", "demo-l15/5": "greetings"})
_HOT = re.compile(r"[0-9@]")


def make_events(tokenizer, messages: list[dict], completion: str, *, detectors=("pii-probe",), model: str = "smollm2",
                deployment: str = "prod", when: datetime | None = None, text: str = "flagged",
                request_id: str | None = None, read_reply: bool = False, redaction=(),
                sealer=None) -> tuple[list[dict], dict]:
    """(alert events, incident event) of one request on which `detectors` fired."""
    request_id = request_id or uuid.uuid4().hex
    prompt = chat_token_ids(tokenizer, messages, add_generation_prompt=True)
    ids = prompt + tokenizer(completion + "<|im_end|>", add_special_tokens=False)["input_ids"]
    n_prompt, n = len(prompt), len(ids)
    pos = np.arange(n)
    hot = np.array([bool(_HOT.search(tokenizer.decode([i]))) for i in ids])
    rng = np.random.default_rng(abs(hash(request_id)) % 2**32)
    logit = np.where(hot, 2.5, -3.0) + rng.normal(0, 0.4, n)
    feature = np.where(hot, 3.0, 0.0) * rng.uniform(0.6, 1.2, n)
    inputs = {"pii/score": logit, "demo-l15/1234": feature}
    verdicts, alerts = [], []
    builder = EventBuilder(model=model, deployment=deployment, explanations=EXPLANATIONS)
    running = {}
    for name in detectors:
        spec = SPECS[name]
        probe = name.startswith("pii-")
        col = 1 / (1 + np.exp(-logit)) if probe else feature
        run = np.maximum.accumulate(col[1:])  # max aggregation, row 0 skipped as the runtime does
        running[name] = (pos[1:], run)
        crossed = np.flatnonzero(run >= spec.lowest_threshold)
        fired = crossed.size > 0
        label = "pii/score" if probe else "demo-l15/1234"
        raw = inputs[label]
        top = tuple((float(col[j]), int(j), {label: float(raw[j])}) for j in np.argsort(col[1:])[-5:] + 1)
        alert_id = str(uuid.uuid4()) if fired else None
        fired_at = int(crossed[0] + 1) if fired else None
        u = DetectorUpdate("req-" + request_id, request_id, f"chatcmpl-{request_id}", 0, spec, float(run[-1]), fired,
                           alert_id, fired_at, top, fired, True)
        verdicts.append(u)
        if fired:
            alerts.append(builder.build(u))
    evidence = sorted({p for _, p, _ in verdicts[0].top})
    context = tuple(FeatureContext(p, "demo-l15", ((1234, float(feature[p])), (77, 1.1), (5, 0.2))) for p in evidence)
    trace = TraceArrays(pos, np.asarray(ids), inputs, running)
    inc = Incident("req-" + request_id, request_id, f"chatcmpl-{request_id}", 0, n_prompt, tuple(verdicts), trace,
                   context, 0, 0, None)
    ib = IncidentBuilder(model=model, deployment=deployment, explanations=EXPLANATIONS, text=text,
                         tokenizer=tokenizer if text == "flagged" else None,
                         reply=ReplyReader(tokenizer) if read_reply else None, redaction=list(redaction), sealer=sealer)
    event = ib.build(inc)
    if when is not None:
        stamp = rfc3339(when.astimezone(timezone.utc))
        event["time"] = stamp
        for a in alerts:
            a["time"] = stamp
    return alerts, event
