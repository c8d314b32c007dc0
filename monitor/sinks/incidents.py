"""Incident events: one CloudEvent per fired request when it finishes, with the evidence of why.

Type `io.misalignment-monitor.incident.v1`, schema `monitor/schemas/incident.v1.json` (generated
from `IncidentEvent`; `python -m monitor.sinks.incidents --check`), on its own topic, keyed by the
request id. It names the alert ids it belongs to (the alert events of the same request), every
detector that judged the request with its definition and calibration provenance, the per-token
trace (every watched input's score, each detector's running score), where each detector fired, the
evidence tokens with the strongest features of a full SAE encode there, the prompt/completion
boundary, and what the trace does not cover.

Text policy (`evidence.text`): `none` (the default) sends positions and scores only, no token id
and no text. `flagged` detokenizes the request in the sidecar and sends text and token ids, after
the `evidence.recognize` recognizers (Presidio: personal data) and the `evidence.redact` rules: a
token that overlaps a redacted span loses its id, and its text becomes the replacement (the first
token of the span) or "" (the rest).

Size: an event over `incidents.max_event_bytes` has its trace trimmed to the tokens nearest the
evidence (the window narrows until it fits) and says so in `data.trace.trimmed`.
"""

from __future__ import annotations

import re
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

import numpy as np
from pydantic import Field

from monitor.config.models import DetectorSpec, Redaction
from monitor.detectors.trace import Incident
from monitor.sinks.recognizers import PiiRecognizers
from monitor.sinks.reply import UNKNOWN, ReplyReader, severity_for
from monitor.sinks.sealing import Sealer
from monitor.sinks import strict_json
from monitor.sinks.events import EvidenceInput, EvidenceToken, FeatureExplanations, rfc3339
from monitor.sinks.schemas import DATE_TIME, CloudEvent, Strict, generated_schema, schema_command, shipped

EVENT_TYPE = "io.misalignment-monitor.incident.v1"
SCHEMA_REF = "misalignment-monitor/incident.v1.json"
SCHEMA_FILE = "schemas/incident.v1.json"


class IncidentDetector(Strict):
    name: str
    concept: str
    severity: Literal["critical", "warning", "info"] = Field(
        description="On this incident: the detector's `severity_if_answered` when the model answered, else its own.")
    fired: bool
    alert_id: str | None = Field(description="The alert events' `alert_id` when it fired.")
    score: float | None = Field(description="Final score (null when no token was in its scope).")
    threshold: float = Field(description="The page tier's threshold (`definition.record_threshold`: the record tier's).")
    tier: Literal["record", "page"] | None = Field(
        None, description="The highest tier it reached when it fired: `page` (its `threshold`) or `record` (its "
                          "`record_threshold`: recorded, never paged).")
    fired_at_position: int | None
    definition: DetectorSpec = Field(description="The detector file as it was in force: inputs, aggregation, scope, "
                                     "and `calibration` (where the threshold came from: target FPR, its bound, data digest).")
    evidence: list[EvidenceToken] = Field(description="The tokens that drove the score, highest first.")


class RunningScore(Strict):
    positions: list[int]
    scores: list[float] = Field(description="The detector's score after each of these tokens (its trajectory).")


class Trimmed(Strict):
    window: int = Field(description="Tokens kept either side of an evidence token.")
    kept_tokens: int
    dropped_tokens: int


class Trace(Strict):
    positions: list[int]
    token_ids: list[int | None] | None = Field(description="Input token of each position; null everywhere under "
                                               "`evidence.text: none`, null for a redacted token.")
    text: list[str] | None = Field(description="Each token's text (after redaction), only under `evidence.text: flagged`.")
    inputs: dict[str, list[float]] = Field(description="Every watched input on the request's layers, per token, in its "
                                           "own space (SAE activation or probe logit).")
    running: dict[str, RunningScore] = Field(description="Each detector's score trajectory over its scope.")
    trimmed: Trimmed | None = Field(None, description="Set when the trace was cut to fit `max_event_bytes`.")


class ContextFeature(Strict):
    feature: int
    activation: float
    explanation: str | None = Field(None, exclude_if=lambda v: v is None)


class TokenContext(Strict):
    position: int
    sae: str
    features: list[ContextFeature] = Field(description="Strongest features of the full SAE encode at this token.")


class Coverage(Strict):
    uncovered_positions: int = Field(description="Positions vLLM never computed (prefix-cache hits): never scored.")
    untraced_tokens: int = Field(description="Scored, but beyond a trace cap: not in `trace`.")


class IncidentData(Strict):
    alert_ids: list[str] = Field(min_length=1)
    request_id: str
    response_id: str
    sample: int = Field(ge=0)
    model: str
    deployment: str
    namespace: str | None = None
    pod: str | None = None
    prompt_tokens: int = Field(ge=0, description="Positions below this are the prompt; the rest were generated.")
    end_time: str | None = Field(None, json_schema_extra=DATE_TIME,
                                 description="End of the request's last forward pass that brought rows.")
    detectors: list[IncidentDetector]
    trace: Trace
    context: list[TokenContext]
    coverage: Coverage
    text_policy: Literal["none", "flagged"]
    redacted_by: list[str] = Field(description="Names of the redaction rules that matched.")
    mode: Literal["live", "shadow"] = Field(
        "live", description="`shadow` when every detector that fired is in shadow mode (watched, not trusted): "
                            "the console lists it apart, and it was never paged.")
    sealed: list[SealedValue] | None = Field(
        None, exclude_if=lambda v: v is None, description="With `evidence.reveal_public_key_file`: each redacted "
        "value, sealed; the console reveals it to a reader with the text permission who asks (audited).")
    outcome: Literal["refused", "answered", "no_reply", "unknown"] = Field(
        "unknown", description="How the model's reply began, read in the sidecar: `refused` (a refusal opens it), "
        "`answered` (no refusal: the model went along), `no_reply`, `unknown` (the reply is not read: "
        "`evidence.read_reply`).")
    tier: Literal["record", "page"] = Field(
        "page", description="`page` when a detector that fired (of the incident's `mode`) reached its page tier; "
                            "`record` when each reached only its record tier: kept for review, nobody was paged.")


class SealedValue(Strict):
    position: int = Field(ge=0, description="The token that carries the replacement (`[EMAIL_ADDRESS]`).")
    box: str = Field(description="The redacted tokens' original text, sealed to the console's public key "
                                 "(base64 libsodium sealed box); only a console holding the private key opens it.")


class IncidentEvent(CloudEvent):
    """misalignment-monitor incident event (CloudEvents 1.0, structured JSON mode)"""

    type: Literal["io.misalignment-monitor.incident.v1"] = EVENT_TYPE
    dataschema: str = SCHEMA_REF
    data: IncidentData


def incident_schema() -> dict:
    return shipped(SCHEMA_FILE)


def _floats(a: np.ndarray) -> list[float]:
    return [float(f"{x:.6g}") for x in np.asarray(a, dtype=np.float64).tolist()]


def _replace(out: list[str], hit: list[bool], spans: list[tuple[int, int]], replacement: str) -> None:
    """Tokens overlapping a span: the first becomes the replacement, the rest ""."""
    starts = np.cumsum([0] + [len(t) for t in out[:-1]]) if out else []
    for a, b in spans:
        first = True
        for j, (s, t) in enumerate(zip(starts, out)):
            if s < b and s + len(t) > a:  # the token overlaps the match
                out[j] = replacement if first else ""
                hit[j], first = True, False


def redact(texts: list[str], rules: list[Redaction], recognizers: PiiRecognizers | None = None,
           ) -> tuple[list[str], list[bool], list[str]]:
    """Personal data the recognizers find (each becomes `[ENTITY]`), then the configured patterns; returns
    each token's text, whether it was redacted, and the names of the recognizers and rules that matched."""
    out, hit, names = list(texts), [False] * len(texts), []
    if recognizers is not None and out:
        kept: list = []
        for f in sorted(recognizers.find("".join(out)), key=lambda f: -f.score):  # a card is not also a phone number
            if all(f.end <= k.start or f.start >= k.end for k in kept):
                kept.append(f)
        for entity in sorted({k.entity for k in kept}):
            names.append(entity.lower().replace("_", "-"))
            _replace(out, hit, [(k.start, k.end) for k in kept if k.entity == entity], f"[{entity}]")
    for rule in rules:
        spans = [m.span() for m in re.finditer(rule.pattern, "".join(out)) if m.end() > m.start()]
        if spans:
            names.append(rule.name)
            _replace(out, hit, spans, rule.replacement)
    return out, hit, names


@dataclass
class IncidentBuilder:
    model: str
    deployment: str
    pod: str | None = None
    namespace: str | None = None
    explanations: FeatureExplanations = field(default_factory=FeatureExplanations)
    text: Literal["none", "flagged"] = "none"
    redaction: list[Redaction] = field(default_factory=list)
    recognizers: PiiRecognizers | None = None
    tokenizer: object | None = None  # needed for text: flagged
    reply: ReplyReader | None = None  # reads the outcome (did the model refuse?) when set
    sealer: Sealer | None = None  # seals the redacted values to the console's key when set
    max_bytes: int = 900_000

    def __post_init__(self) -> None:
        if self.text == "flagged" and self.tokenizer is None:
            raise ValueError("evidence.text: flagged needs a tokenizer")

    def build(self, inc: Incident) -> dict:
        fired = inc.fired
        t = inc.trace
        token_ids: list[int | None] | None = None
        text: list[str] | None = None
        redacted_by: list[str] = []
        sealed: list[SealedValue] | None = None
        if self.text == "flagged" and t.token_ids is not None:
            ids = [int(i) for i in t.token_ids.tolist()]
            texts = [self.tokenizer.decode([i]) for i in ids]
            text, hit, redacted_by = redact(texts, self.redaction, self.recognizers)
            token_ids = [None if h else i for i, h in zip(ids, hit)]
            if self.sealer is not None:
                sealed = [SealedValue(position=v.position, box=v.box)
                          for v in self.sealer.seal(texts, text, hit, t.positions.tolist())]
        outcome = self.reply(inc) if self.reply is not None else UNKNOWN
        mode = "shadow" if all(u.detector.mode == "shadow" for u in fired) else "live"
        detectors = [IncidentDetector(
            name=u.detector.name, concept=u.detector.concept,
            severity=severity_for(u.detector, outcome.outcome) if u.fired else u.detector.severity, fired=u.fired,
            alert_id=u.alert_id, score=None if np.isnan(u.score) else u.score, threshold=u.detector.threshold,
            tier=u.tier, fired_at_position=u.fired_at, definition=u.detector,
            evidence=[EvidenceToken(position=e.position, score=e.score, inputs=[
                EvidenceInput(input=k, value=v, explanation=self.explanations.by_input.get(k))
                for k, v in e.inputs.items()]) for e in u.evidence]) for u in inc.verdicts]
        context = [TokenContext(position=c.position, sae=c.sae, features=[
            ContextFeature(feature=f, activation=float(f"{a:.6g}"),
                           explanation=self.explanations.by_input.get(f"{c.sae}/{f}")) for f, a in c.features])
            for c in inc.context]
        data = dict(
            alert_ids=[u.alert_id for u in fired], request_id=inc.request_id, response_id=inc.external_id,
            sample=inc.sample, model=self.model, deployment=self.deployment, namespace=self.namespace, pod=self.pod,
            prompt_tokens=inc.n_prompt,
            end_time=None if inc.end_time is None else rfc3339(datetime.fromtimestamp(inc.end_time, timezone.utc)),
            detectors=detectors, context=context,
            coverage=Coverage(uncovered_positions=inc.uncovered_positions, untraced_tokens=inc.untraced_tokens),
            text_policy=self.text, redacted_by=redacted_by,
            mode=mode, tier="page" if any(u.paged for u in fired if mode == "shadow" or u.detector.mode == "live")
            else "record", outcome=outcome.outcome, sealed=sealed)
        evidence = sorted({e.position for u in fired for e in u.evidence})
        keep = np.ones(len(t.positions), dtype=bool)
        window = None
        while True:
            trace = self._trace(inc, keep, token_ids, text, window)
            event = IncidentEvent(id=str(uuid.uuid4()), source=f"/misalignment-monitor/{self.deployment}/{self.pod or 'local'}",
                                  time=rfc3339(datetime.now(timezone.utc)), subject=inc.request_id,
                                  data=IncidentData(trace=trace, **data)).model_dump(mode="json")
            if len(strict_json.dumps(event)) <= self.max_bytes or window == 0:
                return event
            window = (int(keep.sum()) // 4) if window is None else window // 2
            keep = np.zeros(len(t.positions), dtype=bool)
            for p in evidence:
                keep |= np.abs(t.positions - p) <= window

    def _trace(self, inc: Incident, keep: np.ndarray, token_ids, text, window: int | None) -> Trace:
        t = inc.trace
        positions = t.positions[keep]
        running = {}
        for d, (pos, vals) in t.running.items():
            m = np.isin(pos, positions)
            running[d] = RunningScore(positions=pos[m].tolist(), scores=_floats(vals[m]))
        pick = np.flatnonzero(keep).tolist()
        return Trace(
            positions=positions.tolist(),
            token_ids=None if token_ids is None else [token_ids[j] for j in pick],
            text=None if text is None else [text[j] for j in pick],
            inputs={k: _floats(v[keep]) for k, v in t.inputs.items()}, running=running,
            trimmed=None if window is None else Trimmed(window=window, kept_tokens=int(keep.sum()),
                                                        dropped_tokens=int((~keep).sum())))


def main(argv: list[str] | None = None) -> int:
    return schema_command(lambda: generated_schema(IncidentEvent, SCHEMA_REF), SCHEMA_FILE, "monitor.sinks.incidents",
                          argv)


if __name__ == "__main__":
    sys.exit(main())
