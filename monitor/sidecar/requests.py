"""Requests in flight: each gets a slot, an index into every per-request array of the sidecar.

The slot table holds what the loop needs per request and per poll (the next position expected,
positions never computed, rows, when it was last seen) as arrays, so splitting a slot's rows among
hundreds of requests is a handful of array operations. What is only read when a request starts,
fires or ends (its ids, prompt length) stays in one small object per request.

Slots are reused as requests end; the table grows by doubling up to `limit`, beyond which a new
request is not tracked at all (never half-scored) and counted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from monitor.detectors.aggregate import grown


@dataclass
class RequestInfo:
    req: str  # the engine's internal id
    request_id: str
    external_id: str
    sample: int
    n_prompt: int
    slot: int


class SlotTable:
    """Slot allocation and per-request counters. `on_grow(capacity)` lets owners of other per-slot arrays follow."""

    def __init__(self, limit: int, capacity: int = 64, forget_after: int = 65536) -> None:
        self.limit = limit
        capacity = min(capacity, limit)
        self.by_req: dict[str, RequestInfo] = {}
        self.info: list[RequestInfo | None] = [None] * capacity
        self.next_pos = np.zeros(capacity, dtype=np.int64)
        self.uncovered = np.zeros(capacity, dtype=np.int64)  # positions never computed (prefix-cache hits)
        self.rows = np.zeros(capacity, dtype=np.int64)
        self.last_seen = np.zeros(capacity)  # monotonic seconds
        self.step_time = np.full(capacity, np.nan)  # wall-clock end of the last forward pass that brought rows
        self.in_use = np.zeros(capacity, dtype=bool)
        self._free = list(range(capacity - 1, -1, -1))
        # Requests that ended, remembered for a while: rows arriving after the end (a second copy from
        # another producer, a late slot) must not start the request again.
        self.ended: OrderedDict[str, None] = OrderedDict()
        self.forget_after = forget_after
        self.on_grow: list[Callable[[int], None]] = []

    @property
    def capacity(self) -> int:
        return len(self.info)

    def __len__(self) -> int:
        return len(self.by_req)

    def open(self, req: str, request_id: str, external_id: str, sample: int, n_prompt: int) -> RequestInfo | None:
        """A slot for a new request, or None when `limit` requests are already tracked."""
        if len(self.by_req) >= self.limit:
            return None
        if not self._free:
            self._grow(min(self.limit, 2 * self.capacity))
        slot = self._free.pop()
        info = RequestInfo(req, request_id, external_id, sample, n_prompt, slot)
        self.by_req[req] = self.info[slot] = info
        self.next_pos[slot] = self.uncovered[slot] = self.rows[slot] = 0
        self.step_time[slot] = np.nan
        self.in_use[slot] = True
        return info

    def close(self, req: str, ended: bool = True) -> RequestInfo | None:
        """Free a request's slot. `ended`: vLLM said it finished, so rows arriving later are not a new
        request (a request that timed out may yet send rows: it starts again)."""
        info = self.by_req.pop(req, None)
        if info is None:
            return None
        self.info[info.slot] = None
        self.in_use[info.slot] = False
        self._free.append(info.slot)
        if ended:
            self.remember_ended(req)
        return info

    def remember_ended(self, req: str) -> None:
        self.ended[req] = None
        if len(self.ended) > self.forget_after:
            self.ended.popitem(last=False)

    def _grow(self, capacity: int) -> None:
        old, c = self.capacity, capacity
        self.info.extend([None] * (capacity - old))
        self.next_pos, self.uncovered = grown(self.next_pos, c, 0), grown(self.uncovered, c, 0)
        self.rows = grown(self.rows, c, 0)
        self.last_seen, self.step_time = grown(self.last_seen, c, 0.0), grown(self.step_time, c, np.nan)
        self.in_use = grown(self.in_use, c, False)
        self._free.extend(range(capacity - 1, old - 1, -1))
        for fn in self.on_grow:
            fn(capacity)
