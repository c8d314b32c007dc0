"""Alert events: CloudEvents 1.0 in structured JSON mode, schema `monitor/schemas/alert.v1.json`.

One event when a detector fires on a request (revision 0), and one when the request finishes
(same `alert_id`, revision 1, `final: true`) carrying the score and evidence as they ended up. Event ids are unique per
event: delivery is at least once, consumers dedupe on `id`. The Kafka key is the request id, so one
request's events stay in order. No prompt or completion text is included: the rows carry none.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from monitor.sidecar.loop import DetectorUpdate

EVENT_TYPE = "io.misalignment-monitor.alert.v1"
# The schema's own $id; the file ships in the package (monitor/schemas/alert.v1.json).
SCHEMA_REF = "misalignment-monitor/alert.v1.json"


def alert_schema() -> dict:
    return json.loads(resources.files("monitor").joinpath("schemas/alert.v1.json").read_text())


def _rfc3339(t: datetime) -> str:
    # Microseconds: detection latency on loopback is a few milliseconds.
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class FeatureExplanations:
    """`{"<sae>/<feature>": explanation}` from the SAEs' label files, read once (never at alert time)."""

    by_input: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, label_files: dict[str, Path]) -> "FeatureExplanations":
        out: dict[str, str] = {}
        for sae, path in label_files.items():
            features = json.loads(Path(path).read_text()).get("features", {})
            out.update({f"{sae}/{k}": v.get("explanation", "") for k, v in features.items() if v.get("explanation")})
        return cls(out)


@dataclass
class EventBuilder:
    model: str
    deployment: str
    pod: str | None = None
    explanations: FeatureExplanations = field(default_factory=FeatureExplanations)
    _revisions: dict[str, int] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"/misalignment-monitor/{self.deployment}/{self.pod or 'local'}"

    def build(self, u: DetectorUpdate) -> dict | None:
        """The event for a detector update, or None when there is nothing to say (not fired)."""
        st = u.state
        if not st.fired or st.alert_id is None or not (u.fired_now or u.final):
            return None
        revision = self._revisions.get(st.alert_id, -1) + 1
        if u.final:
            self._revisions.pop(st.alert_id, None)
        else:
            self._revisions[st.alert_id] = revision
        spec = u.detector
        tokens = [{
            "position": e.position,
            "score": e.score,
            "inputs": [{"input": name, "value": value, **({"explanation": self.explanations.by_input[name]}
                                                          if name in self.explanations.by_input else {})}
                       for name, value in e.inputs.items()],
        } for e in st.evidence()]
        return {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": self.source,
            "type": EVENT_TYPE,
            "time": _rfc3339(datetime.now(timezone.utc)),
            "datacontenttype": "application/json",
            "dataschema": SCHEMA_REF,
            "subject": u.request_id,
            "data": {
                "alert_id": st.alert_id, "revision": revision, "request_id": u.request_id,
                "response_id": u.external_id, "sample": u.sample, "model": self.model,
                "deployment": self.deployment, "pod": self.pod, "detector": spec.name, "concept": spec.concept,
                "severity": spec.severity, "score": st.score, "threshold": spec.threshold,
                "aggregation": spec.aggregation.model_dump(), "scope": spec.scope,
                "fired_at_position": st.fired_at,
                "forward_pass_time": (_rfc3339(datetime.fromtimestamp(u.step_time, timezone.utc))
                                      if u.step_time is not None else None),
                "final": u.final, "labels": dict(spec.labels), "tokens": tokens,
            },
        }
