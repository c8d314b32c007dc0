"""`monitor sidecar --decisions FILE`: one JSON line per detector firing and per final verdict.

Ids and scores only, never text: the file is safe to keep beside the sidecar's logs.
"""

from __future__ import annotations

import time

from monitor.detectors.updates import DetectorUpdate
from monitor.sinks.jsonl import JsonLines


class DecisionLog(JsonLines):
    def __call__(self, u: DetectorUpdate) -> None:
        if not (u.fired_now or u.escalated_now or u.final):
            return
        d = u.detector
        self.write({
            "event": "fired" if u.fired_now else "escalated" if u.escalated_now else "final", "time": time.time(), "request_id": u.request_id,
            "external_id": u.external_id, "sample": u.sample, "detector": d.name, "concept": d.concept,
            "severity": d.severity, "mode": d.mode, "score": u.score, "threshold": d.threshold, "fired": u.fired,
            "tier": u.tier, "record_threshold": d.record_threshold, "alert_id": u.alert_id, "fired_at_position": u.fired_at,
            "top_tokens": [{"position": e.position, "score": e.score, "inputs": e.inputs} for e in u.evidence],
        })
