"""Streaming token aggregations: feed token scores as they arrive, read the request's score any time.

Each aggregator holds O(window) state, so a request of any length costs bounded memory, and a
verdict can be reached mid-generation.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from monitor.config.models import CountAbove, EmaMax, FractionAbove, Max, Mean, RollingMeanMax


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
    if isinstance(spec, EmaMax):
        return EmaMaxAgg(spec.alpha)
    if isinstance(spec, RollingMeanMax):
        return RollingMeanMaxAgg(spec.window)
    if isinstance(spec, (CountAbove, FractionAbove)):
        thr = spec.token_threshold if token_transform is None else token_transform(spec.token_threshold)
        return CountAboveAgg(thr, spec.min_tokens, isinstance(spec, FractionAbove))
    raise TypeError(f"unknown aggregation {spec!r}")
