"""Drift: is production traffic still the traffic the thresholds were calibrated on?

A threshold is only as good as the match between the benign set it was set on and what the model
sees now. `monitor calibrate` stores a baseline beside each threshold (`provenance.Baseline`): the
detector's score distribution in bins, and each input's firing rate per prompt token. The sidecar
keeps, per detector, the final scores of its last `window_requests` requests, and per watched input
its firing counts over the last `window_tokens` prompt tokens, and compares them with the baseline by
the population-stability index,

    PSI = sum_i (q_i - p_i) * ln(q_i / p_i)

(p: baseline shares, q: window shares, over the same bins; a firing rate is two bins, fired or not).
The usual reading: below 0.1 stable, 0.1-0.25 a moderate shift, above 0.25 a shift worth a look.
PSI rather than a KS statistic because it is additive over bins, needs only the stored bin shares
(no benign scores kept), and has a conventional scale that an alert rule can use.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from monitor.config.models import DetectorSpec
from monitor.detectors.runtime import DetectorSet
from monitor.provenance import Baseline
from monitor.scoring.tokens import TokenScores

SMOOTH = 0.5  # added to each window bin's count, so an empty bin has a finite log ratio
FLOOR = 1e-4  # the smallest baseline share: a bin the calibration set never filled


def score_bins(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin: bin i holds edges[i-1] <= x < edges[i]; NaN scores (nothing in scope) are left out."""
    scores = scores[~np.isnan(scores)]
    return np.bincount(np.searchsorted(edges, scores, side="right"), minlength=len(edges) + 1)


def psi(baseline: np.ndarray, counts: np.ndarray) -> float:
    """PSI of window `counts` against `baseline` shares (same bins)."""
    p = np.maximum(np.asarray(baseline, np.float64), FLOOR)
    p = p / p.sum()
    q = (np.asarray(counts, np.float64) + SMOOTH) / (counts.sum() + SMOOTH * len(counts))
    return float(np.sum((q - p) * np.log(q / p)))


def rate_psi(baseline_rate: float, fired: int, total: int) -> float:
    return psi(np.array([baseline_rate, 1.0 - baseline_rate]), np.array([fired, total - fired]))


def make_baseline(scores: np.ndarray, input_rates: dict[str, float], n_tokens: int, bins: int = 10) -> Baseline:
    """Bins at the deciles of the calibration scores (merged where scores tie), and their shares."""
    finite = scores[~np.isnan(scores)]
    if finite.size == 0:
        raise ValueError("no calibration request had a token in the detector's scope; no baseline can be made")
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = score_bins(finite, edges)
    return Baseline(score_edges=[float(e) for e in edges], score_fractions=[float(c) for c in counts / counts.sum()],
                    input_rates=input_rates, n_requests=int(finite.size), n_tokens=n_tokens)


@dataclass(frozen=True)
class DetectorDrift:
    detector: str
    requests: int  # in the window
    psi: float | None  # None before min_requests


@dataclass(frozen=True)
class InputDrift:
    input: str  # "pii/score", "demo-l15/21"
    tokens: int
    rate: float | None  # firing rate in the window; None before any token
    baseline: float | None  # None when no detector using it was calibrated with a baseline
    psi: float | None


class DriftTracker:
    """Windows of final scores and input firing counts; figures computed when read (at scrape time).

    Fed from the sidecar's thread (`on_tokens`, `on_final`), read from the metrics server's: one lock."""

    def __init__(self, window_requests: int, window_tokens: int, min_requests: int) -> None:
        self.window_requests = window_requests
        self.window_tokens = window_tokens
        self.min_requests = min_requests
        self.min_tokens = max(100, window_tokens // 10)  # a firing rate over fewer tokens is noise
        self._lock = threading.Lock()
        self._scores: dict[str, deque[float]] = {}
        self._baselines: dict[str, Baseline] = {}
        self._input_baselines: dict[str, float] = {}
        self._chunks: dict[str, deque[tuple[int, int]]] = {}  # input -> (tokens, fired) per scored chunk
        self._totals: dict[str, list[int]] = {}  # input -> [tokens, fired] over its chunks
        self._for: DetectorSet | None = None

    def follow(self, ds: DetectorSet) -> None:
        """Adopt a detector set's baselines (a reload keeps the windows of detectors that stay)."""
        if ds is self._for:
            return
        with self._lock:
            self._for = ds
            names = {d.spec.name for d in ds.detectors}
            self._scores = {n: self._scores.get(n, deque(maxlen=self.window_requests)) for n in names}
            self._baselines = {d.spec.name: d.spec.calibration.baseline for d in ds.detectors
                               if d.spec.calibration is not None and d.spec.calibration.baseline is not None}
            self._input_baselines = {label: rate for b in self._baselines.values() for label, rate in b.input_rates.items()}
            labels = {label for head in ds.heads.values() for label in head.columns}
            self._chunks = {lb: self._chunks.get(lb, deque()) for lb in labels}
            self._totals = {lb: self._totals.get(lb, [0, 0]) for lb in labels}

    def on_tokens(self, t: TokenScores, ds: DetectorSet) -> None:
        prompt = t.is_prompt & (t.positions >= 1)  # row 0, the attention sink, is never scored by a detector
        n = int(prompt.sum())
        if n == 0:
            return
        self.follow(ds)
        with self._lock:
            for name, values in t.scores.items():
                head = ds.heads.get(name)
                if head is None:
                    continue
                fired = (values[prompt] > 0).sum(axis=0)  # probe logit > 0 (p > 0.5); SAE feature active
                for label, f in zip(head.columns, fired):
                    chunks, total = self._chunks[label], self._totals[label]
                    chunks.append((n, int(f)))
                    total[0] += n
                    total[1] += int(f)
                    while total[0] - chunks[0][0] >= self.window_tokens:
                        old_n, old_f = chunks.popleft()
                        total[0] -= old_n
                        total[1] -= old_f

    def on_final(self, spec: DetectorSpec, score: float) -> None:
        if np.isnan(score):
            return
        with self._lock:
            window = self._scores.get(spec.name)
            if window is not None:
                window.append(score)

    def detectors(self) -> list[DetectorDrift]:
        with self._lock:
            out = []
            for name, window in sorted(self._scores.items()):
                base = self._baselines.get(name)
                value = None
                if base is not None and len(window) >= self.min_requests:
                    counts = score_bins(np.fromiter(window, np.float64), np.asarray(base.score_edges))
                    value = psi(np.asarray(base.score_fractions), counts)
                out.append(DetectorDrift(name, len(window), value))
            return out

    def inputs(self) -> list[InputDrift]:
        with self._lock:
            out = []
            for label, (tokens, fired) in sorted(self._totals.items()):
                base = self._input_baselines.get(label)
                rate = fired / tokens if tokens else None
                value = rate_psi(base, fired, tokens) if base is not None and tokens >= self.min_tokens else None
                out.append(InputDrift(label, tokens, rate, base, value))
            return out
