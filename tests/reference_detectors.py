"""The detectors' scalar reference: one request at a time, token by token, in plain Python.

This is how detectors were written before their state moved into arrays over requests
(`monitor.detectors.aggregate`, `DetectorBank`); `tests/test_detector_bank.py` requires the two to
agree on random streams. Kept deliberately simple: it is the specification, not the product.
"""

from __future__ import annotations

import heapq
import math
import uuid
from collections import deque

import numpy as np

from monitor.config.models import CountAbove, EmaMax, FractionAbove, Last, Max, Mean, RollingMeanMax


class Aggregator:
    def update(self, values: np.ndarray, running: bool = False) -> np.ndarray | None:
        """Feed token scores; with `running`, return the aggregate as it stood after each of them
        (what an incident's score trajectory shows)."""
        raise NotImplementedError

    @property
    def value(self) -> float:
        """The aggregate so far; NaN before any token."""
        raise NotImplementedError


class MaxAgg(Aggregator):
    def __init__(self) -> None:
        self._n, self._max = 0, -np.inf

    def update(self, values: np.ndarray, running: bool = False) -> np.ndarray | None:
        if not len(values):
            return values.astype(np.float64) if running else None
        out = np.maximum(np.maximum.accumulate(values.astype(np.float64)), self._max) if running else None
        self._n += len(values)
        self._max = max(self._max, float(values.max()))
        return out

    @property
    def value(self) -> float:
        return self._max if self._n else float("nan")


class MeanAgg(Aggregator):
    def __init__(self) -> None:
        self._n, self._sum = 0, 0.0

    def update(self, values: np.ndarray, running: bool = False) -> np.ndarray | None:
        out = None
        if running:
            out = (self._sum + np.cumsum(values, dtype=np.float64)) / (self._n + np.arange(1, len(values) + 1))
        self._n += len(values)
        self._sum += float(values.sum(dtype=np.float64))
        return out

    @property
    def value(self) -> float:
        return self._sum / self._n if self._n else float("nan")


class LastAgg(Aggregator):
    def __init__(self) -> None:
        self._n, self._last = 0, float("nan")

    def update(self, values: np.ndarray, running: bool = False) -> np.ndarray | None:
        if len(values):
            self._last = float(values[-1])
        self._n += len(values)
        return values.astype(np.float64) if running else None

    @property
    def value(self) -> float:
        return self._last


class EmaMaxAgg(Aggregator):
    """max over t of e_t, with e_1 = v_1 and e_t = alpha * v_t + (1 - alpha) * e_{t-1}."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self._n, self._ema, self._max = 0, 0.0, -np.inf

    def update(self, values: np.ndarray, running: bool = False) -> np.ndarray | None:
        out = []
        for v in values.tolist():
            self._ema = v if self._n == 0 else self.alpha * v + (1 - self.alpha) * self._ema
            self._n += 1
            self._max = max(self._max, self._ema)
            out.append(self._max)
        return np.asarray(out, dtype=np.float64) if running else None

    @property
    def value(self) -> float:
        return self._max if self._n else float("nan")


class RollingMeanMaxAgg(Aggregator):
    """max over full windows of the window mean; until `window` tokens have arrived, the mean so far."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._n, self._buf, self._sum, self._max = 0, deque(), 0.0, -np.inf

    def update(self, values: np.ndarray, running: bool = False) -> np.ndarray | None:
        out = []
        for v in values.tolist():
            self._buf.append(v)
            self._sum += v
            self._n += 1
            if len(self._buf) > self.window:
                self._sum -= self._buf.popleft()
            if len(self._buf) == self.window:
                self._max = max(self._max, self._sum / self.window)
            out.append(self.value)
        return np.asarray(out, dtype=np.float64) if running else None

    @property
    def value(self) -> float:
        if self._n == 0:
            return float("nan")
        return self._max if self._n >= self.window else self._sum / self._n


class CountAboveAgg(Aggregator):
    def __init__(self, token_threshold: float, min_tokens: int, fraction: bool) -> None:
        self.token_threshold, self.min_tokens, self.fraction = token_threshold, min_tokens, fraction
        self._n, self._above = 0, 0

    def update(self, values: np.ndarray, running: bool = False) -> np.ndarray | None:
        out = None
        above = values >= self.token_threshold
        if running:
            count = self._above + np.cumsum(above)
            value = count / (self._n + np.arange(1, len(values) + 1)) if self.fraction else count.astype(np.float64)
            out = np.where(count < self.min_tokens, 0.0, value)
        self._n += len(values)
        self._above += int(above.sum())
        return out

    @property
    def value(self) -> float:
        if self._n == 0:
            return float("nan")
        if self._above < self.min_tokens:
            return 0.0
        return self._above / self._n if self.fraction else float(self._above)


def make_aggregator(spec, token_transform=None) -> Aggregator:
    """`token_transform` maps a token threshold into score space (probe logits: logit(p))."""
    if isinstance(spec, Max):
        return MaxAgg()
    if isinstance(spec, Mean):
        return MeanAgg()
    if isinstance(spec, Last):
        return LastAgg()
    if isinstance(spec, EmaMax):
        return EmaMaxAgg(spec.alpha)
    if isinstance(spec, RollingMeanMax):
        return RollingMeanMaxAgg(spec.window)
    if isinstance(spec, (CountAbove, FractionAbove)):
        thr = spec.token_threshold if token_transform is None else token_transform(spec.token_threshold)
        return CountAboveAgg(thr, spec.min_tokens, isinstance(spec, FractionAbove))
    raise TypeError(f"unknown aggregation {spec!r}")


from dataclasses import dataclass, field  # noqa: E402

from monitor.detectors.runtime import TOP_TOKENS, CompiledDetector, in_scope, token_scores  # noqa: E402
from monitor.detectors.updates import DetectorUpdate, TokenEvidence, ranked  # noqa: E402
from monitor.scoring.space import logit, sigmoid  # noqa: E402


def new_state(det: CompiledDetector) -> "DetectorState":
    transform = logit if det.probe_only and det.spec.combine != "weighted" else None
    n_aggs = 1 if det.spec.combine == "weighted" else len(det.inputs)
    return DetectorState(det, [make_aggregator(det.spec.aggregation, transform) for _ in range(n_aggs)])


@dataclass
class DetectorState:
    detector: CompiledDetector
    aggs: list[Aggregator]
    fired: bool = False
    alert_id: str | None = None
    fired_at: int | None = None  # position of the token that pushed it over
    paged: bool = False  # reached the page tier (`threshold`)
    escalated_now: bool = False  # the last update raised a record-tier alert to the page tier
    top: list[tuple[float, int, dict]] = field(default_factory=list)  # min-heap of (score, position, inputs)
    running: np.ndarray | None = None  # with update(..., running=True): the score after each token of that call
    running_positions: np.ndarray | None = None  # their positions (set by `feed`)
    top_version: int = 0  # counts changes to `top`: a trace rebuilds its evidence windows only then
    _score: float = float("nan")  # as of the last update (a reload keeps what a detector measures, so it holds)

    def _combine_aggs(self) -> float:
        vals = [a.value for a in self.aggs]
        if any(math.isnan(v) for v in vals):
            vals = [v for v in vals if not math.isnan(v)]
            if not vals:
                return float("nan")
        spec = self.detector.spec
        raw = min(vals) if spec.combine == "all" else max(vals)
        if self.detector.probe_only and not self.detector.counts and spec.combine != "weighted":
            return sigmoid(raw)
        return raw

    @property
    def score(self) -> float:
        return self._score

    def _combine_running(self, runs: list[np.ndarray]) -> np.ndarray:
        """`_combine_aggs`, token by token: per aggregator [tokens] -> [tokens]."""
        spec = self.detector.spec
        if len(runs) == 1:
            raw = runs[0]
        else:
            raw = np.min(runs, axis=0) if spec.combine == "all" else np.max(runs, axis=0)
        if self.detector.probe_only and not self.detector.counts and spec.combine != "weighted":
            return sigmoid(raw)
        return raw

    def update(self, positions: np.ndarray, columns: list[np.ndarray], running: bool = False) -> bool:
        """Feed in-scope tokens (`columns[i]` = input i's scores). Returns True when this call fired.

        With `running`, `self.running` is then the detector's score after each of these tokens."""
        if len(positions) == 0:
            return False
        det = self.detector
        many = running and len(positions) > 1  # one token's running score is just the score after it
        if det.spec.combine == "weighted":
            runs = [self.aggs[0].update(sum(ref.weight * col for ref, col in zip(det.inputs, columns)), many)]
        else:
            runs = [agg.update(col, many) for agg, col in zip(self.aggs, columns)]
        if many:
            self.running = self._combine_running(runs)
        scores = token_scores(det.spec, columns, det.probe_only)
        for j in np.argsort(scores)[-TOP_TOKENS:]:
            score = float(scores[j])
            if len(self.top) == TOP_TOKENS and score <= self.top[0][0]:
                continue
            item = (score, int(positions[j]), {ref.label: float(col[j]) for ref, col in zip(det.inputs, columns)})
            if len(self.top) < TOP_TOKENS:
                heapq.heappush(self.top, item)
            else:
                heapq.heapreplace(self.top, item)
            self.top_version += 1
        score = self._score = self._combine_aggs()
        if running and not many:
            self.running = np.array([score])
        # Two tiers: it fires (once) at the lower one; the same alert escalates (once) at `threshold`.
        self.escalated_now = self.fired and not self.paged and score >= det.spec.threshold
        self.paged = self.paged or score >= det.spec.threshold
        if not self.fired and score >= det.spec.lowest_threshold:
            self.fired = True
            self.alert_id = str(uuid.uuid4())
            self.fired_at = int(positions[-1])
            return True
        return False

    def evidence(self) -> list[TokenEvidence]:
        return list(ranked(self.top))

    def snapshot(self, req: str, request_id: str, external_id: str, sample: int, *, fired_now: bool, final: bool,
                 step_time: float | None = None) -> DetectorUpdate:
        """The state as it is now, frozen: what sinks receive."""
        # The heap's items are made once and never changed, so the snapshot may share them.
        tier = "page" if self.paged else "record" if self.fired else None
        return DetectorUpdate(req, request_id, external_id, sample, self.detector.spec, self.score, self.fired,
                              self.alert_id, self.fired_at, tuple(self.top), fired_now, final, step_time, tier,
                              self.escalated_now)


def feed(det: CompiledDetector, state: DetectorState | None, positions: np.ndarray, n_prompt: int,
         scores: dict[str, np.ndarray], running: bool = False) -> tuple[DetectorState | None, bool]:
    """Give a detector one batch of a request's tokens (`scores`: head -> [n, k] for `positions`).

    The one place where a detector meets token scores: the sidecar and offline evaluation both call
    it, so a detector is judged offline exactly as it is in production. Returns the state (created
    on the first in-scope token), or None when no token of this batch is in scope, and whether this
    batch fired it. With `running`, `state.running` holds the score after each in-scope token and
    `state.running_positions` their positions.
    """
    mask = in_scope(det.spec, positions, n_prompt)
    if det.spec.scope == "prompt" and det.spec.aggregation.kind == "last" and positions[-1] + 1 < n_prompt:
        mask[:] = False  # the prompt's last token is judged when it arrives, not the end of an earlier chunk
    if not mask.any():
        return None, False
    if state is None:
        state = new_state(det)
    cols = [scores[ref.head][mask, ref.column].astype(np.float64) for ref in det.inputs]
    fired = state.update(positions[mask], cols, running)
    if running:
        state.running_positions = positions[mask]
    return state, fired


