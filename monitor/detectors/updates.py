"""What detectors hand down to the sinks: frozen snapshots, never the live per-request state.

A sink may keep an update as long as it likes (a spool, a queue, a test) without seeing it change
under it as later tokens arrive.
"""

from __future__ import annotations

from dataclasses import dataclass

from monitor.config.models import DetectorSpec


@dataclass(frozen=True)
class TokenEvidence:
    position: int
    score: float  # the token's combined score (a probability for probe-only detectors)
    inputs: dict[str, float]  # input label ("<sae>/<feature>", "<probe>/<output>") -> its value at this token


@dataclass(frozen=True)
class DetectorUpdate:
    req: str  # the engine's internal id
    request_id: str
    external_id: str
    sample: int
    detector: DetectorSpec
    score: float  # NaN while no token was in scope
    fired: bool
    alert_id: str | None  # set once the detector has fired on this request, stable afterwards
    fired_at: int | None  # position of the token that pushed it over
    top: tuple[tuple[float, int, dict[str, float]], ...]  # the top tokens so far as (score, position, inputs), unsorted
    fired_now: bool  # this update is the one that fired it
    final: bool  # the request finished: this is the verdict
    step_time: float | None = None  # wall-clock end of the forward pass whose rows caused this update
    tier: str | None = None  # the highest tier reached: "page", "record" (a detector with a record_threshold), None
    escalated_now: bool = False  # this update raised the alert from `record` to `page`

    def __post_init__(self) -> None:
        if self.tier is None and self.fired:  # built without the runtime's tier (a test, a bench): from the score
            tier = "page" if self.detector.record_threshold is None else self.detector.tier_of(self.score) or "record"
            object.__setattr__(self, "tier", tier)

    @property
    def paged(self) -> bool:
        """The alert reached the page tier: it pages (live detectors) and acts."""
        return self.tier == "page"

    @property
    def tier_threshold(self) -> float:
        """The threshold of the tier reached (the page tier's before it fires)."""
        return self.detector.record_threshold if self.tier == "record" else self.detector.threshold

    @property
    def evidence(self) -> tuple[TokenEvidence, ...]:
        """The top tokens, highest first. Sorted when read: most updates never are (only fires and verdicts)."""
        return ranked(self.top)


def ranked(top) -> tuple[TokenEvidence, ...]:
    """(score, position, inputs) items, highest score first (then the later position)."""
    return tuple(TokenEvidence(p, s, i) for s, p, i in sorted(top, key=lambda t: (t[0], t[1]), reverse=True))
