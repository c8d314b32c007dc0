"""Alert events: CloudEvents 1.0 in structured JSON mode, defined by the `AlertEvent` model.

One event when a detector fires on a request (revision 0), one more when a detector with two tiers
escalates the same alert from `record` to `page`, and one when the request finishes (same `alert_id`,
the next revision, `final: true`) carrying the score, tier and evidence as they ended up. Event ids
are unique per event: delivery is at least once, consumers dedupe on `id`. The Kafka key is the
request id, so one request's events stay in order. No prompt or completion text is included: the
rows carry none.

The JSON schema shipped in the package (`monitor/schemas/alert.v1.json`) is generated from the
model: `python -m monitor.sinks.events` writes it, `--check` fails when it is stale (a test runs it).
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import Field

from monitor.config.models import Aggregation
from monitor.detectors.updates import DetectorUpdate
from monitor.sinks.schemas import DATE_TIME, CloudEvent, Strict, generated_schema, schema_command, shipped

EVENT_TYPE = "io.misalignment-monitor.alert.v1"
# The schema's own $id; the file ships in the package (monitor/schemas/alert.v1.json).
SCHEMA_REF = "misalignment-monitor/alert.v1.json"
SCHEMA_FILE = "schemas/alert.v1.json"
# Alerts written before detectors had tiers carry none; each of them paged.
DEFAULT_TIER = "page"


def tier_of(detector: dict) -> str:
    """The tier an alert event's `data` (or a stored copy of it) reached."""
    return detector.get("tier", DEFAULT_TIER)


class EvidenceInput(Strict):
    input: str = Field(description="<sae>/<feature> or <probe>/<output>")
    value: float = Field(description="The input's score at this token, in its own space (activation or logit).")
    explanation: str | None = Field(None, exclude_if=lambda v: v is None,
                                    description="The feature's explanation from its SAE's label file.")


class EvidenceToken(Strict):
    position: int = Field(ge=0)
    score: float
    inputs: list[EvidenceInput]


class AlertData(Strict):
    alert_id: str = Field(description="Stable for one detector on one request; later evidence updates it.")
    revision: int = Field(ge=0, description="0 when the detector fires, then 1, 2, ... for updates.")
    request_id: str
    response_id: str = Field(description="The API's response id, e.g. chatcmpl-<request_id>.")
    sample: int = Field(ge=0)
    model: str
    deployment: str
    namespace: str | None = Field(None, description="The deployment's Kubernetes namespace (`deployment.namespace`).")
    pod: str | None = None
    detector: str
    concept: str
    severity: Literal["critical", "warning", "info"]
    score: float = Field(description="The detector's score: a probability for probe-only detectors, else in its "
                                     "inputs' units (see docs/configuration.md, `threshold`).")
    threshold: float = Field(description="The threshold of the tier reached (`tier`).")
    tier: Literal["record", "page"] = Field(
        DEFAULT_TIER, description="The highest tier the alert reached: `page` (the detector's `threshold`: pages when "
                            "live, acts) or `record` (its `record_threshold`: an incident is recorded, nobody is "
                            "paged, nothing acts). A two-tier alert that escalates sends a new revision with `page`.")
    aggregation: Aggregation
    scope: Literal["prompt", "generation", "both"]
    action: Literal["none", "annotate", "abort"] = Field(
        "none", description="The detector's action, ordered from vLLM's API server when it fired (docs/enforcement.md); "
                            "an abort that came after the request had finished became an annotation.")
    mode: Literal["live", "shadow"] = Field(
        "live", description="`shadow`: the detector is watched, not trusted: it neither pages nor acts, and "
                            "consumers that act on alerts should skip it.")
    fired_at_position: int = Field(ge=0)
    forward_pass_time: str | None = Field(
        None, json_schema_extra=DATE_TIME,
        description="End of the forward pass whose rows caused this event (detection latency = time - this).")
    final: bool = Field(description="True when the request has finished: this is the verdict.")
    labels: dict[str, str]
    tokens: list[EvidenceToken] = Field(description="The tokens that drove the score, highest first. Never text.")
    console_url: str | None = Field(None, exclude_if=lambda v: v is None,
                                    description="The incident's page in the console (set when `console.base_url` is).")


class AlertEvent(CloudEvent):
    """misalignment-monitor alert event (CloudEvents 1.0, structured JSON mode)"""

    type: Literal["io.misalignment-monitor.alert.v1"] = EVENT_TYPE
    dataschema: str = SCHEMA_REF
    data: AlertData


def alert_schema() -> dict:
    return shipped(SCHEMA_FILE)


def rfc3339(t: datetime) -> str:
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
    namespace: str | None = None
    explanations: FeatureExplanations = field(default_factory=FeatureExplanations)
    console_url: str | None = None  # the console's base URL: events link to the incident page
    _revisions: dict[str, int] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"/misalignment-monitor/{self.deployment}/{self.pod or 'local'}"

    def build(self, u: DetectorUpdate) -> dict | None:
        """The event (as JSON-ready data) for a detector update, or None when there is nothing to say."""
        if not u.fired or u.alert_id is None or not (u.fired_now or u.escalated_now or u.final):
            return None
        revision = self._revisions.get(u.alert_id, -1) + 1
        if u.final:
            self._revisions.pop(u.alert_id, None)
        else:
            self._revisions[u.alert_id] = revision
        spec = u.detector
        tokens = [EvidenceToken(position=e.position, score=e.score, inputs=[
            EvidenceInput(input=name, value=value, explanation=self.explanations.by_input.get(name))
            for name, value in e.inputs.items()]) for e in u.evidence]
        event = AlertEvent(
            id=str(uuid.uuid4()), source=self.source, time=rfc3339(datetime.now(timezone.utc)), subject=u.request_id,
            data=AlertData(
                alert_id=u.alert_id, revision=revision, request_id=u.request_id, response_id=u.external_id,
                sample=u.sample, model=self.model, deployment=self.deployment, namespace=self.namespace, pod=self.pod,
                detector=spec.name, concept=spec.concept, severity=spec.severity, score=u.score,
                threshold=u.tier_threshold, tier=u.tier or "page", aggregation=spec.aggregation, scope=spec.scope,
                action="none" if spec.mode == "shadow" or not u.paged else spec.action, mode=spec.mode, fired_at_position=u.fired_at,
                forward_pass_time=(rfc3339(datetime.fromtimestamp(u.step_time, timezone.utc))
                                   if u.step_time is not None else None),
                final=u.final, labels=dict(spec.labels), tokens=tokens,
                console_url=f"{self.console_url}/incidents/{u.alert_id}" if self.console_url else None))
        return event.model_dump(mode="json")


def main(argv: list[str] | None = None) -> int:
    return schema_command(lambda: generated_schema(AlertEvent, SCHEMA_REF), SCHEMA_FILE, "monitor.sinks.events", argv)


if __name__ == "__main__":
    sys.exit(main())
