"""Streaming token aggregations for many requests at once: state in arrays indexed by a request slot.

A poll hands every aggregator a `Ragged` batch: for each request with tokens in the poll, its new
token scores as one row of a padded [requests, tokens, inputs] array (a detector's inputs side by
side: one aggregator serves all of them). Each update is a few array
operations over the whole batch (an accumulate along the token axis, a gather), never a Python loop
over requests or tokens, so a decode step of hundreds of requests costs what one request costs.

State per request is O(window) (the rolling mean keeps its last `window` scores), so a request of
any length costs bounded memory and a verdict can be reached mid-generation. The semantics are the
scalar ones the detectors always had; `tests/test_detector_bank.py` runs reference scalar
implementations beside these on random streams and requires the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from monitor.config.models import CountAbove, EmaMax, FractionAbove, Last, Max, Mean, RollingMeanMax


@dataclass(frozen=True)
class Ragged:
    """Tokens of several requests: request i's tokens are flat[index[i, :counts[i]]], in order.

    `slots[i]` is request i's slot in the state arrays. Rows are padded to the longest request;
    `mask` says which entries are real.
    """

    slots: np.ndarray  # [S] int64
    counts: np.ndarray  # [S] int64, >= 1
    index: np.ndarray  # [S, L] int64, into the flat per-token arrays (0 where padded)
    mask: np.ndarray  # [S, L] bool

    @classmethod
    def of(cls, slots: np.ndarray, first: np.ndarray, counts: np.ndarray) -> "Ragged":
        """Request i's tokens are flat[first[i] : first[i] + counts[i]]."""
        width = int(counts.max()) if len(counts) else 0
        steps = np.arange(width)
        mask = steps < counts[:, None]
        index = np.where(mask, first[:, None] + steps, 0)
        return cls(slots, counts, index, mask)

    def gather(self, flat: np.ndarray, pad: float = 0.0) -> np.ndarray:
        """A flat per-token array ([n] or [n, W]) as [S, L] (or [S, L, W]), `pad` where there is no token."""
        mask = self.mask if flat.ndim == 1 else self.mask[:, :, None]
        return np.where(mask, flat[self.index], pad)

    @property
    def last(self) -> np.ndarray:
        """Column of each request's last token."""
        return self.counts - 1


class VecAggregator:
    """Aggregation state for `capacity` request slots and `width` inputs; grows on demand.

    Every state array is made by `_array`, which records its fresh value: growing and resetting slots
    is then the same for every aggregation."""

    def __init__(self, capacity: int, width: int = 1) -> None:
        self._fresh: dict[str, object] = {}
        self.n = self._array("n", capacity, (), 0, np.int64)  # tokens seen: the same for every input

    def _array(self, name: str, capacity: int, tail: tuple[int, ...], fresh, dtype=np.float64) -> np.ndarray:
        self._fresh[name] = fresh
        return np.full((capacity, *tail), fresh, dtype=dtype)

    @property
    def capacity(self) -> int:
        return len(self.n)

    def grow(self, capacity: int) -> None:
        for name, fresh in self._fresh.items():
            setattr(self, name, grown(getattr(self, name), capacity, fresh))

    def reset(self, slots: np.ndarray) -> None:
        for name, fresh in self._fresh.items():
            getattr(self, name)[slots] = fresh

    def update(self, batch: Ragged, values: np.ndarray) -> np.ndarray:
        """Feed `values` [S, L, W] (padding ignored); returns the aggregate after each token [S, L, W]
        (padding: unspecified)."""
        raise NotImplementedError

    def value(self, slots: np.ndarray) -> np.ndarray:
        """The aggregate so far [S, W]; NaN for a slot with no token yet."""
        raise NotImplementedError

    def _seen(self, batch: Ragged, width: int) -> np.ndarray:
        """[S, L, 1]: tokens seen after each new one."""
        return (self.n[batch.slots][:, None] + np.arange(1, width + 1))[:, :, None]


class VecMax(VecAggregator):
    def __init__(self, capacity: int, width: int = 1) -> None:
        super().__init__(capacity, width)
        self.max = self._array("max", capacity, (width,), -np.inf)

    def update(self, batch: Ragged, values: np.ndarray) -> np.ndarray:
        s = batch.slots
        run = np.maximum(np.maximum.accumulate(np.where(batch.mask[:, :, None], values, -np.inf), axis=1),
                         self.max[s][:, None])
        self.max[s] = run[:, -1]  # padding is -inf: the last column carries the maximum
        self.n[s] += batch.counts
        return run

    def value(self, slots: np.ndarray) -> np.ndarray:
        return np.where(self.n[slots][:, None] > 0, self.max[slots], np.nan)


class VecMean(VecAggregator):
    def __init__(self, capacity: int, width: int = 1) -> None:
        super().__init__(capacity, width)
        self.sum = self._array("sum", capacity, (width,), 0.0)

    def update(self, batch: Ragged, values: np.ndarray) -> np.ndarray:
        s = batch.slots
        total = np.cumsum(np.where(batch.mask[:, :, None], values, 0.0), axis=1) + self.sum[s][:, None]
        seen = self._seen(batch, values.shape[1])
        self.sum[s] = total[:, -1]
        self.n[s] += batch.counts
        return total / seen

    def value(self, slots: np.ndarray) -> np.ndarray:
        n = self.n[slots][:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, self.sum[slots] / n, np.nan)


class VecLast(VecAggregator):
    def __init__(self, capacity: int, width: int = 1) -> None:
        super().__init__(capacity, width)
        self.last = self._array("last", capacity, (width,), np.nan)

    def update(self, batch: Ragged, values: np.ndarray) -> np.ndarray:
        s = batch.slots
        self.last[s] = values[np.arange(len(s)), batch.last]
        self.n[s] += batch.counts
        return values

    def value(self, slots: np.ndarray) -> np.ndarray:
        return self.last[slots]


class VecEmaMax(VecAggregator):
    """max over t of e_t, with e_1 = v_1 and e_t = alpha * v_t + (1 - alpha) * e_{t-1}.

    The recurrence runs along the token axis in scipy's `lfilter` (C), for all requests at once."""

    def __init__(self, capacity: int, alpha: float, width: int = 1) -> None:
        super().__init__(capacity, width)
        self.alpha = alpha
        self.ema = self._array("ema", capacity, (width,), 0.0)
        self.max = self._array("max", capacity, (width,), -np.inf)

    def update(self, batch: Ragged, values: np.ndarray) -> np.ndarray:
        s, a = batch.slots, self.alpha
        mask = batch.mask[:, :, None]
        values = np.where(mask, values, 0.0)
        # A fresh request starts from e_0 = v_1, so that e_1 = a v_1 + (1 - a) v_1 = v_1.
        start = np.where(self.n[s][:, None] > 0, self.ema[s], values[:, 0])
        ema, _ = lfilter([a], [1.0, a - 1.0], values, axis=1, zi=((1.0 - a) * start)[:, None])
        run = np.maximum(np.maximum.accumulate(np.where(mask, ema, -np.inf), axis=1), self.max[s][:, None])
        self.ema[s] = ema[np.arange(len(s)), batch.last]
        self.max[s] = run[:, -1]
        self.n[s] += batch.counts
        return run

    def value(self, slots: np.ndarray) -> np.ndarray:
        return np.where(self.n[slots][:, None] > 0, self.max[slots], np.nan)


class VecRollingMeanMax(VecAggregator):
    """max over full windows of the window mean; until `window` tokens have arrived, the mean so far.

    Each slot keeps its last `window` scores (right-aligned, zeros before the first), so window sums
    of a batch are differences of one cumulative sum over [kept, new]."""

    def __init__(self, capacity: int, window: int, width: int = 1) -> None:
        super().__init__(capacity, width)
        self.window = window
        self.recent = self._array("recent", capacity, (window, width), 0.0)
        self.max = self._array("max", capacity, (width,), -np.inf)

    def update(self, batch: Ragged, values: np.ndarray) -> np.ndarray:
        s, w = batch.slots, self.window
        length = values.shape[1]
        mask = batch.mask[:, :, None]
        x = np.concatenate([self.recent[s], np.where(mask, values, 0.0)], axis=1)  # [S, w + L, W]
        csum = np.concatenate([np.zeros((len(s), 1, x.shape[2])), np.cumsum(x, axis=1)], axis=1)
        cols = np.arange(length)
        window_sum = csum[:, w + 1 + cols] - csum[:, 1 + cols]  # the w scores ending at each new token
        seen = self._seen(batch, length)
        full = seen >= w
        best = np.maximum(np.maximum.accumulate(np.where(full & mask, window_sum / w, -np.inf), axis=1),
                          self.max[s][:, None])
        run = np.where(full, best, window_sum / seen)
        self.recent[s] = np.take_along_axis(x, (batch.counts[:, None] + np.arange(w))[:, :, None], axis=1)
        self.max[s] = best[:, -1]
        self.n[s] += batch.counts
        return run

    def value(self, slots: np.ndarray) -> np.ndarray:
        n = self.n[slots][:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            so_far = self.recent[slots].sum(axis=1) / n  # before a full window, every score is still kept
            return np.where(n == 0, np.nan, np.where(n >= self.window, self.max[slots], so_far))


class VecCountAbove(VecAggregator):
    def __init__(self, capacity: int, token_threshold: float, min_tokens: int, fraction: bool, width: int = 1) -> None:
        super().__init__(capacity, width)
        self.token_threshold, self.min_tokens, self.fraction = token_threshold, min_tokens, fraction
        self.above = self._array("above", capacity, (width,), 0, np.int64)

    def update(self, batch: Ragged, values: np.ndarray) -> np.ndarray:
        s = batch.slots
        count = self.above[s][:, None] + np.cumsum(batch.mask[:, :, None] & (values >= self.token_threshold), axis=1)
        self.above[s] = count[:, -1]
        seen = self._seen(batch, values.shape[1])
        self.n[s] += batch.counts
        value = count / seen if self.fraction else count.astype(np.float64)
        return np.where(count < self.min_tokens, 0.0, value)

    def value(self, slots: np.ndarray) -> np.ndarray:
        n, above = self.n[slots][:, None], self.above[slots]
        with np.errstate(invalid="ignore", divide="ignore"):
            value = above / n if self.fraction else above.astype(np.float64)
        return np.where(n == 0, np.nan, np.where(above < self.min_tokens, 0.0, value))


def make_aggregator(spec, capacity: int, token_transform=None, width: int = 1) -> VecAggregator:
    """`token_transform` maps a token threshold into score space (probe logits: logit(p)); `width`: inputs."""
    if isinstance(spec, Max):
        return VecMax(capacity, width)
    if isinstance(spec, Mean):
        return VecMean(capacity, width)
    if isinstance(spec, Last):
        return VecLast(capacity, width)
    if isinstance(spec, EmaMax):
        return VecEmaMax(capacity, spec.alpha, width)
    if isinstance(spec, RollingMeanMax):
        return VecRollingMeanMax(capacity, spec.window, width)
    if isinstance(spec, (CountAbove, FractionAbove)):
        thr = spec.token_threshold if token_transform is None else token_transform(spec.token_threshold)
        return VecCountAbove(capacity, thr, spec.min_tokens, isinstance(spec, FractionAbove), width)
    raise TypeError(f"unknown aggregation {spec!r}")


def grown(a: np.ndarray, capacity: int, fill) -> np.ndarray:
    """`a` with `capacity` rows: the old ones, then `fill`."""
    out = np.full((capacity,) + a.shape[1:], fill, dtype=a.dtype)
    out[: len(a)] = a
    return out
