"""What a request leaves behind when a detector fires on it: its trace, assembled into an `Incident`.

While requests run, a `TraceStore` keeps, per token: the position, the input token id, the score of
every watched input on the request's layers, and each detector's running score. Every traced request
shares one columnar arena, appended once per poll for all requests together (a decode step of
hundreds of requests is one array copy, not hundreds of small ones); a request's rows are found by
its serial number when it becomes an incident, and space of finished requests is reclaimed by
compacting the arena once half of it is dead. It also keeps the residual rows of the tokens that
currently drive a detector (and `window` tokens either side), so the incident can say what else
the model represented there: the rows of the last `HISTORY` polls stay at hand (one contiguous copy
per poll) with each request pointing at its last `window` rows there, and a token that becomes
evidence is copied out, per request, only when a detector's top tokens change.

Everything is bounded: tokens per request and tokens in total (a `TraceBudget` shared by all
requests); tokens beyond a cap are not kept and are counted. Rows are kept only around evidence
tokens, at most `detectors x TOP_TOKENS x (2 window + 1)` per request, plus the last `HISTORY` polls'
rows per context layer. A request that finishes without a fire releases its trace at once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from monitor.detectors.aggregate import grown
from monitor.detectors.updates import DetectorUpdate


@dataclass
class TraceBudget:
    """Token caps shared by every request's trace, and how often they were hit."""

    per_request: int
    total: int
    used: int = 0
    capped_request: int = 0  # tokens not kept: their request's trace was full
    capped_total: int = 0  # tokens not kept: every trace together was full
    context_rows: int = 0  # residual rows held for feature context
    context_evicted: int = 0  # rows let go to make room (from requests that had not fired)
    context_dropped: int = 0  # rows not kept: the budget was full of fired requests' rows

    def take(self, have: np.ndarray, want: np.ndarray) -> np.ndarray:
        """How many of `want[i]` more tokens each trace holding `have[i]` may keep, in order (earlier
        requests get the room left first); the rest are counted against the cap that bound."""
        allowed = np.minimum(want, np.maximum(0, self.per_request - have))
        room = max(0, self.total - self.used)
        n = np.clip(room - (np.cumsum(allowed) - allowed), 0, allowed)
        self.capped_request += int((want - allowed).sum())
        self.capped_total += int((allowed - n).sum())
        self.used += int(n.sum())
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
    """A growable array (rows appended, kept rows compacted): a decode step's tokens add no Python object."""

    def __init__(self, dtype, width: int | None = None, fill=0) -> None:
        self.buf = np.full((64,) if width is None else (64, width), fill, dtype=dtype)
        self.fill = fill
        self.n = 0

    @classmethod
    def filled(cls, n: int, dtype, width: int | None, fill) -> "Column":
        c = cls(dtype, width, fill)
        c.extend(np.full((n,) if width is None else (n, width), fill, dtype=dtype))
        return c

    @property
    def width(self) -> int | None:
        return self.buf.shape[1] if self.buf.ndim == 2 else None

    def extend(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self.buf):
            grown = np.full((max(need, 2 * len(self.buf)),) + self.buf.shape[1:], self.fill, dtype=self.buf.dtype)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : need] = values
        self.n = need

    def compact(self, keep: np.ndarray) -> None:
        kept = self.buf[: self.n][keep]
        self.buf[: len(kept)] = kept
        self.n = len(kept)

    def view(self) -> np.ndarray:
        return self.buf[: self.n]


HISTORY = 16  # polls whose rows stay at hand for evidence neighbours (a step spanning more slots loses some)


class TraceStore:
    """The traces of every request in flight, indexed by request slot (see the module's docstring)."""

    def __init__(self, budget: TraceBudget, window: int, capacity: int = 64, max_context_rows: int = 32768) -> None:
        self.budget, self.window = budget, window
        self.max_context_rows = max_context_rows
        # Slots holding context rows whose request has not fired, oldest first: they make room when the budget is full.
        self._unfired_holders: OrderedDict[int, None] = OrderedDict()
        self._fired: Callable[[int], bool] | None = None  # during keep_rows: has a detector fired on a slot
        self.serial = np.full(capacity, -1, dtype=np.int64)  # the traced request in each slot; -1: none
        self.kept = np.zeros(capacity, dtype=np.int64)
        self.untraced = np.zeros(capacity, dtype=np.int64)
        self.has_ids = np.ones(capacity, dtype=bool)
        self._next_serial = 0
        # The arena: one entry per traced token of every request.
        self.owner = Column(np.int64, fill=-1)
        self.positions = Column(np.int64)
        self.token_ids = Column(np.int32)
        self.scores: dict[str, Column] = {}  # head -> [tokens, columns]
        self.head_bad: dict[str, set[int]] = {}  # a head's columns do not line up for these requests' serials
        self.running: dict[str, Column] = {}  # detector -> score after each token (NaN: not in its scope)
        self.dead = 0  # arena entries of released requests, reclaimed by `_compact`
        # Residual rows for feature context.
        self.rows: dict[int, dict[int, dict[int, torch.Tensor]]] = {}  # slot -> position -> layer -> row
        self._wanted: dict[int, set[int]] = {}  # slot -> evidence positions and their windows
        self.want_until = np.full(capacity, -1, dtype=np.int64)  # the last wanted position, per slot
        # Each request's last `window` rows: their positions, and where they are in the history pool.
        self.recent_pos = np.full((capacity, window), -1, dtype=np.int64)
        self.recent_from = np.full((capacity, window), -1, dtype=np.int64)  # the pool serial, -1: none
        self.recent_row = np.zeros((capacity, window), dtype=np.int64)
        self.history: dict[int, list[torch.Tensor | None]] = {}  # layer -> the last HISTORY polls' rows
        self._history_serial = 0

    @property
    def capacity(self) -> int:
        return len(self.serial)

    def grow(self, capacity: int) -> None:
        c = capacity
        self.serial, self.kept = grown(self.serial, c, -1), grown(self.kept, c, 0)
        self.untraced = grown(self.untraced, c, 0)
        self.has_ids, self.want_until = grown(self.has_ids, c, True), grown(self.want_until, c, -1)
        self.recent_pos, self.recent_from = grown(self.recent_pos, c, -1), grown(self.recent_from, c, -1)
        self.recent_row = grown(self.recent_row, c, 0)

    def open(self, slots: np.ndarray) -> None:
        """New requests in these slots: their traces start empty."""
        self.serial[slots] = self._next_serial + np.arange(len(slots))
        self._next_serial += len(slots)
        self.kept[slots] = 0
        self.untraced[slots] = 0
        self.has_ids[slots] = True
        self.want_until[slots] = -1
        self.recent_pos[slots] = -1
        self.recent_from[slots] = -1

    def add(self, slots: np.ndarray, first: np.ndarray, counts: np.ndarray, positions: np.ndarray,
            token_ids: np.ndarray | None, scores: dict[str, np.ndarray]) -> np.ndarray:
        """Append each request's new tokens (flat rows first[i] ... first[i] + counts[i]) as far as the caps
        allow (the first ones). Returns, per flat row, its arena entry (-1: not traced)."""
        had = (self.serial >= 0) & (self.kept > 0)  # requests with tokens traced before this poll
        n = self.budget.take(self.kept[slots], counts)
        self.untraced[slots] += counts - n
        self.kept[slots] += n
        entry = np.full(len(positions), -1, dtype=np.int64)
        total = int(n.sum())
        if total == 0:
            return entry
        seg = np.repeat(np.arange(len(slots)), n)
        rows = first[seg] + np.arange(total) - np.repeat(np.cumsum(n) - n, n)
        entry[rows] = self.owner.n + np.arange(total)
        base = self.owner.n
        self.owner.extend(self.serial[slots][seg])
        self.positions.extend(positions[rows])
        if token_ids is None:
            self.has_ids[slots] = False
            self.token_ids.extend(np.zeros(total, dtype=np.int32))
        else:
            self.token_ids.extend(token_ids[rows])
        for head, s in scores.items():
            col = self.scores.get(head)
            if col is None or col.width != s.shape[1]:  # new, or its columns changed (a reload)
                col = self.scores[head] = Column.filled(base, np.float32, s.shape[1], np.nan)
                self.head_bad[head] = set(self.serial[had].tolist())  # their earlier tokens lack it
            col.extend(s[rows])
        for col in self.running.values():
            col.extend(np.full(total, np.nan))
        for head, col in self.scores.items():  # a head not scored in this poll keeps its rows aligned
            if col.n < self.owner.n:
                col.extend(np.full((self.owner.n - col.n, col.width), np.nan, dtype=np.float32))
        return entry

    def add_running(self, detector: str, entries: np.ndarray, values: np.ndarray) -> None:
        """A detector's running score at these arena entries (-1: a token the trace did not keep)."""
        col = self.running.get(detector)
        if col is None:
            col = self.running[detector] = Column.filled(self.owner.n, np.float64, None, np.nan)
        ok = entries >= 0
        col.buf[entries[ok]] = values[ok]

    def keep_rows(self, slots: np.ndarray, first: np.ndarray, counts: np.ndarray, positions: np.ndarray,
                  rows: dict[int, torch.Tensor], changed: set[int], evidence: Callable[[int], set[int]],
                  fired: Callable[[int], bool] = lambda slot: False) -> None:
        """Keep the rows of evidence tokens and their windows; let go of the rest.

        Request i's new rows are rows[layer][first[i] : first[i] + counts[i]]. `changed`: slots whose
        detectors' top tokens moved in this poll (`evidence(slot)` then says where they are now);
        `fired(slot)`: whether a detector fired on it (its rows are then never evicted)."""
        w = self.window
        if not rows:
            return
        starts = positions[first]
        waiting = np.flatnonzero(self.want_until[slots] >= starts)  # a wanted token arrives in this poll
        todo = {int(j) for j in waiting} | {j for j, s in enumerate(slots.tolist()) if s in changed}
        self._fired = fired
        for j in sorted(todo):
            slot = int(slots[j])
            kept = self.rows.setdefault(slot, {})
            if slot in changed:
                wanted = self._wanted[slot] = {p + d for p in evidence(slot) for d in range(-w, w + 1)}
                self.want_until[slot] = max(wanted, default=-1)
                for p in [p for p in kept if p not in wanted]:
                    del kept[p]
                    self.budget.context_rows -= 1
            wanted = self._wanted.get(slot, set())
            has_fired = fired(slot)
            if has_fired:
                self._unfired_holders.pop(slot, None)
            # A kept row is cloned: a view would hold on to the whole slot it came from.
            for col, p in enumerate(self.recent_pos[slot].tolist()):
                if p in wanted and p not in kept and self._room(slot):
                    row = self._recent_row(slot, col)
                    if row is not None:
                        kept[p] = row
                        self.budget.context_rows += 1
            for r in range(int(first[j]), int(first[j] + counts[j])):
                p = int(positions[r])
                if p in wanted and p not in kept and self._room(slot):
                    kept[p] = {layer: t[r].clone() for layer, t in rows.items()}
                    self.budget.context_rows += 1
            if kept and not has_fired and slot not in self._unfired_holders:
                self._unfired_holders[slot] = None
        self._fired = None
        if w:
            self._remember_recent(slots, first, counts, positions, rows)

    def _remember_recent(self, slots, first, counts, positions, rows) -> None:
        """Each request's last `window` rows, for a token that becomes evidence after its neighbours passed:
        those rows (not the whole poll: a prefill slot brings thousands, of which a few are any request's
        last) are copied into a pool of the last `HISTORY` polls, and each request points at its own there."""
        w, k = self.window, self._history_serial
        self._history_serial += 1
        if (counts >= w).all():  # every request brought `window` rows or more (decode, window 1): its last ones
            last = _last_rows(first, counts, w)
            self._keep_history(k, rows, last.ravel())
            self.recent_pos[slots] = positions[last]
            self.recent_from[slots] = k
            self.recent_row[slots] = np.arange(last.size).reshape(last.shape)
            return
        old = (self.recent_pos[slots], self.recent_from[slots], self.recent_row[slots])
        new = tuple(np.empty_like(a) for a in old)
        everyone = np.arange(len(slots))
        srcs = [counts - w + col for col in range(w)]  # >= 0: the request's new row; < 0: its old column w + src
        taken = np.unique(np.concatenate([(first + src)[src >= 0] for src in srcs]))
        self._keep_history(k, rows, taken)
        for col, src in enumerate(srcs):
            fresh = src >= 0
            row = np.where(fresh, first + src, 0)
            before = np.where(fresh, 0, w + src)
            kept_at = np.searchsorted(taken, row)  # where the row went in this poll's pool entry
            for target, was, now in zip(new, old, (positions[row], np.full(len(slots), k), kept_at)):
                target[:, col] = np.where(fresh, now, was[everyone, before])
        self.recent_pos[slots], self.recent_from[slots], self.recent_row[slots] = new

    def _keep_history(self, k: int, rows: dict[int, torch.Tensor], take: np.ndarray) -> None:
        """Rows `take` of this poll into pool entry k, in that order."""
        m = len(take)
        whole = np.array_equal(take, np.arange(m))  # rows 0..m-1 (decode): one contiguous copy
        index = None
        for layer, t in rows.items():
            if not whole and index is None:
                index = torch.from_numpy(take).to(t.device)  # the rows may be on the scoring GPU
            pool = self.history.setdefault(layer, [None] * HISTORY)
            buf = pool[k % HISTORY]
            if buf is None or len(buf) < m:
                buf = pool[k % HISTORY] = t.new_empty((max(m, 2 * (0 if buf is None else len(buf))), t.shape[1]))
            if whole:
                buf[:m].copy_(t[:m])
            elif m:
                torch.index_select(t, 0, index, out=buf[:m])

    def _room(self, slot: int) -> bool:
        """Room for one more context row for `slot`: the budget has some, or an older request that has not
        fired gives all of its rows back."""
        b = self.budget
        while b.context_rows >= self.max_context_rows:
            victim = next((s for s in self._unfired_holders if s != slot), None)
            if victim is None:
                b.context_dropped += 1
                return False
            del self._unfired_holders[victim]
            if self._fired(victim):  # fired since it was listed: its rows stay
                continue
            freed = len(self.rows.pop(victim, {}))
            b.context_rows -= freed
            b.context_evicted += freed
            self._wanted.pop(victim, None)
            self.want_until[victim] = -1
        return True

    def _recent_row(self, slot: int, col: int) -> dict[int, torch.Tensor] | None:
        """The row a request's recent column points at, if its slot is still in the history pool."""
        k = int(self.recent_from[slot, col])
        if k < 0 or k < self._history_serial - HISTORY:
            return None
        r = int(self.recent_row[slot, col])
        return {layer: pool[k % HISTORY][r].clone() for layer, pool in self.history.items()}

    def arrays(self, slot: int, columns: dict[str, tuple[str, ...]]) -> TraceArrays:
        """One request's trace. `columns`: head -> the label of each of its columns. A head whose columns
        changed while the request ran (a reload) is left out: its numbers no longer line up."""
        serial = int(self.serial[slot])
        idx = np.flatnonzero(self.owner.view() == serial)
        ids = self.token_ids.view()[idx] if self.has_ids[slot] and len(idx) else None
        inputs: dict[str, np.ndarray] = {}
        for head, col in self.scores.items():
            labels = columns.get(head, ())
            if serial in self.head_bad[head] or col.width != len(labels):
                continue
            values = col.view()[idx]
            for j, label in enumerate(labels):
                inputs[label] = values[:, j]
        positions = self.positions.view()[idx]
        running = {}
        for det, col in self.running.items():
            values = col.view()[idx]
            ok = ~np.isnan(values)
            if ok.any():
                running[det] = (positions[ok], values[ok])
        return TraceArrays(positions, ids, inputs, running)

    def release(self, slots: np.ndarray) -> None:
        """These requests ended: their tokens go back to the budget and their arena entries are dead."""
        n = int(self.kept[slots].sum())
        self.budget.give_back(n)
        self.dead += n
        self.kept[slots] = 0
        ended = set(self.serial[slots].tolist())
        for bad in self.head_bad.values():
            bad -= ended
        self.serial[slots] = -1
        for s in np.asarray(slots).tolist():
            self.budget.context_rows -= len(self.rows.pop(s, {}))
            self._wanted.pop(s, None)
            self._unfired_holders.pop(s, None)
        self.want_until[slots] = -1
        if self.dead > max(65536, self.owner.n // 2):
            self._compact()

    def _compact(self) -> None:
        keep = np.isin(self.owner.view(), self.serial[self.serial >= 0])
        for col in [self.owner, self.positions, self.token_ids, *self.scores.values(), *self.running.values()]:
            col.compact(keep)
        self.dead = 0


def _last_rows(first: np.ndarray, counts: np.ndarray, w: int) -> np.ndarray:
    """[S, w]: the flat indices of each request's last `w` rows (every count >= w)."""
    return (first + counts - w)[:, None] + np.arange(w)
