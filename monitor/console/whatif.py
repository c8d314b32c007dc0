"""What if a detector's threshold were X: which of its recorded fires would still fire, and how the
person's verdicts on them split, before anyone edits the pack.

Only fires are stored (an incident per fired request), so a candidate above the running threshold is
answered exactly: a fire stays when its final score reaches the candidate. Below it, the requests that
scored between the two were never recorded as incidents; the page says so and points to the decision
log (`monitor calibrate --from-decisions --dry-run`), which has every request's score.
"""

from __future__ import annotations

from dataclasses import dataclass

from monitor.store.queries import ScoredAlert


@dataclass(frozen=True)
class WhatIf:
    detector: str
    current: float | None  # the threshold it runs with now
    candidate: float
    rows: list[tuple[ScoredAlert, bool]]  # each recorded fire, and whether it fires at the candidate
    true_positives: int  # judged true positive, among the recorded fires
    false_positives: int
    kept_true: int  # ... that still fire at the candidate
    kept_false: int
    kept: int  # fires that still fire (judged or not)

    @property
    def below_current(self) -> bool:
        return self.current is not None and self.candidate < self.current

    @property
    def precision(self) -> float | None:
        """Of the judged fires that still fire, the share that were true positives."""
        judged = self.kept_true + self.kept_false
        return self.kept_true / judged if judged else None

    @property
    def precision_now(self) -> float | None:
        judged = self.true_positives + self.false_positives
        return self.true_positives / judged if judged else None

    @property
    def recall(self) -> float | None:
        """Of the fires judged true positive, the share the candidate still catches (relative to the running
        threshold: true positives it never fired on are not in the store)."""
        return self.kept_true / self.true_positives if self.true_positives else None


def what_if(detector: str, fires: list[ScoredAlert], current: float | None, candidate: float) -> WhatIf:
    rows = [(f, f.score >= candidate) for f in fires]
    tp = [k for f, k in rows if f.verdict == "true_positive"]
    fp = [k for f, k in rows if f.verdict == "false_positive"]
    return WhatIf(detector, current, candidate, rows, len(tp), len(fp), sum(tp), sum(fp), sum(k for _, k in rows))
