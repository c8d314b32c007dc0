"""What a request leaves behind when a detector fires on it: its trace, assembled into an `Incident`.

While a request runs, its `RequestTrace` keeps, per token: the position, the input token id, the
score of every watched input on the request's layers, and each detector's running score; plus the
residual rows of the tokens that currently drive a detector (and `window` tokens either side), so
the incident can say what else the model represented there. Everything is bounded: tokens per
request and tokens in total (a `TraceBudget` shared by all requests); tokens beyond a cap are not
kept and are counted. Rows are kept only around evidence tokens, at most
`detectors x TOP_TOKENS x (2 window + 1)` per request.

A request that finishes without a fire releases its trace at once; nothing is kept past its end.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from monitor.detectors.updates import DetectorUpdate


@dataclass
class TraceBudget:
    """Token caps shared by every request's trace, and how often they were hit."""

    per_request: int
    total: int
    used: int = 0
    capped_request: int = 0  # tokens not kept: their request's trace was full
    capped_total: int = 0  # tokens not kept: every trace together was full

    def take(self, have: int, want: int) -> int:
        """How many of `want` more tokens a trace holding `have` may keep (the rest are counted)."""
        room_request = max(0, self.per_request - have)
        room_total = max(0, self.total - self.used)
        n = min(want, room_request, room_total)
        if n < want:  # counted against the cap that bound
            if room_request <= room_total:
                self.capped_request += want - n
            else:
                self.capped_total += want - n
        self.used += n
        return n

    def give_back(self, n: int) -> None:
        self.used -= n


@dataclass(frozen=True)
class FeatureContext:
    """What else the model represented at one token: an SAE's strongest features there (full encode)."""

    position: int
    sae: str
    features: tuple[tuple[int, float], ...]  # (feature index, activation), strongest first


@dataclass(frozen=True)
class TraceArrays:
    positions: np.ndarray  # [n] int
    token_ids: np.ndarray | None  # [n] int32, or None when the producer sent none
    inputs: dict[str, np.ndarray]  # input label ("<sae>/<feature>", "<probe>/<output>") -> [n], in its own space
    running: dict[str, tuple[np.ndarray, np.ndarray]]  # detector -> (positions in scope, score after each)


@dataclass(frozen=True)
class Incident:
    """A finished request on which at least one detector fired, with the evidence of why."""

    req: str
    request_id: str
    external_id: str
    sample: int
    n_prompt: int
    verdicts: tuple[DetectorUpdate, ...]  # every detector that saw the request, as it ended up
    trace: TraceArrays
    context: tuple[FeatureContext, ...]
    uncovered_positions: int  # never computed by vLLM (prefix-cache hits), so never scored
    untraced_tokens: int  # scored, but beyond a trace cap: not in `trace`
    end_time: float | None = None  # wall-clock end of the request's last forward pass

    @property
    def fired(self) -> tuple[DetectorUpdate, ...]:
        return tuple(v for v in self.verdicts if v.fired)


class Column:
    """A growable array: appending a decode step's one token adds no Python object per token (a list of
    small arrays costs ~2.8 kB a token; this ~100 bytes with the demo's inputs and detectors)."""

    def __init__(self, dtype, width: int | None = None) -> None:
        self.buf = np.empty((16,) if width is None else (16, width), dtype=dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self.buf):
            grown = np.empty((max(need, 2 * len(self.buf)),) + self.buf.shape[1:], dtype=self.buf.dtype)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : need] = values
        self.n = need

    def view(self) -> np.ndarray:
        return self.buf[: self.n]


@dataclass
class RequestTrace:
    window: int  # tokens kept either side of an evidence token, for feature context
    positions: Column = field(default_factory=lambda: Column(np.int64))
    token_ids: Column = field(default_factory=lambda: Column(np.int32))
    has_ids: bool = True
    scores: dict[str, Column] = field(default_factory=dict)  # head -> [tokens, columns]
    bad_heads: set[str] = field(default_factory=set)  # a reload changed their columns mid-request
    running: dict[str, tuple[Column, Column]] = field(default_factory=dict)  # detector -> (positions, scores)
    kept: int = 0
    untraced: int = 0
    rows: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)  # position -> layer -> row
    _wanted: set[int] = field(default_factory=set)  # evidence positions and their windows
    _evidence_version: tuple | None = None
    _recent: deque = field(default_factory=deque)  # (position, {layer: rows}, index) of the last `window` tokens

    def add(self, budget: TraceBudget, positions: np.ndarray, token_ids: np.ndarray | None,
            scores: dict[str, np.ndarray]) -> int:
        """Keep as many of these tokens as the caps allow; returns how many (the first ones)."""
        n = budget.take(self.kept, len(positions))
        self.untraced += len(positions) - n
        if n == 0:
            return 0
        self.positions.extend(positions[:n])
        if token_ids is None:
            self.has_ids = False
        elif self.has_ids:
            self.token_ids.extend(token_ids[:n])
        for head, s in scores.items():
            col = self.scores.get(head)
            if col is None:
                col = self.scores[head] = Column(np.float32, s.shape[1])
                if self.kept:  # a head that appeared mid-request (a reload) does not cover the trace
                    self.bad_heads.add(head)
            if s.shape[1] != col.buf.shape[1]:
                self.bad_heads.add(head)
                continue
            col.extend(s[:n])
        self.kept += n
        return n

    def add_running(self, detector: str, positions: np.ndarray, values: np.ndarray) -> None:
        """A detector's running score at these positions (only positions the trace kept)."""
        if not self.kept:
            return
        keep = positions <= self.positions.buf[self.positions.n - 1]
        if keep.any():
            pos, val = self.running.setdefault(detector, (Column(np.int64), Column(np.float64)))
            pos.extend(positions[keep])
            val.extend(values[keep])

    def keep_rows(self, positions: np.ndarray, rows: dict[int, torch.Tensor], version: tuple,
                  evidence: Callable[[], set[int]]) -> None:
        """Keep the rows of evidence tokens and their windows; let go of the rest.

        `rows[layer][j]` is the row of `positions[j]`; the last `window` rows stay at hand, so a token
        that becomes evidence still finds the rows just before it. `evidence()` is asked only when
        `version` (the detectors' count of changes to their top tokens) moved."""
        w = self.window
        changed = version != self._evidence_version
        if changed:
            self._evidence_version = version
            self._wanted = {p + d for p in evidence() for d in range(-w, w + 1)}
        wanted = self._wanted
        # A kept row is cloned: a view would hold on to the whole slot it came from.
        for p, src, j in self._recent:
            if p in wanted and p not in self.rows:
                self.rows[p] = {layer: t[j].clone() for layer, t in src.items()}
        plist = positions.tolist()
        for j, p in enumerate(plist):
            if p in wanted and p not in self.rows:
                self.rows[p] = {layer: t[j].clone() for layer, t in rows.items()}
        # The recent ones are only referenced: they are cloned if they become wanted, within `window` tokens.
        for j in range(max(0, len(plist) - w), len(plist)):
            self._recent.append((plist[j], rows, j))
        while len(self._recent) > w:
            self._recent.popleft()
        if changed:
            for p in [p for p in self.rows if p not in wanted]:
                del self.rows[p]

    def release(self, budget: TraceBudget) -> None:
        budget.give_back(self.kept)
        self.kept = 0

    def arrays(self, columns: dict[str, tuple[str, ...]]) -> TraceArrays:
        """`columns`: head -> the label of each of its columns. A head whose columns changed mid-request
        (a reload) is left out: its numbers no longer line up."""
        ids = self.token_ids.view() if self.has_ids and self.token_ids.n else None
        inputs: dict[str, np.ndarray] = {}
        for head, col in self.scores.items():
            labels = columns.get(head, ())
            if head in self.bad_heads or col.buf.shape[1] != len(labels):
                continue
            for j, label in enumerate(labels):
                inputs[label] = col.view()[:, j]
        running = {d: (p.view(), v.view()) for d, (p, v) in self.running.items()}
        return TraceArrays(self.positions.view(), ids, inputs, running)
