"""The sidecar's loop: read the rings, score rows, keep per-request detector state, publish.

Per poll, each slot's rows (all requests of a step) are scored in one pass; rows are then split by
request. Per-request state is bounded (detector aggregators are O(window), evidence is the top few
tokens) and released when vLLM reports the request finished or after `transport.request_timeout_s`
without rows. A request's positions arrive in order; rows for positions already seen (a preempted
request being recomputed) are ignored, and positions never computed (prefix-cache hits) are
counted as not covered rather than invented.

With `incidents.enabled`, each request also keeps a bounded trace (`monitor.detectors.trace`); when a
request on which a detector fired finishes, it becomes an `Incident`, with the strongest features of
a full SAE encode at the tokens that drove each detector. Other traces are released at the end.

Consumers subscribe to the `ScoreBus`: per-token scores as they arrive, detector updates, incidents.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from monitor.config.load import LoadedConfig
from monitor.detectors.runtime import DetectorSet, DetectorState, build_detector_set, feed
from monitor.detectors.trace import FeatureContext, Incident, RequestTrace, TraceBudget
from monitor.detectors.updates import DetectorUpdate
from monitor.scoring.tokens import SlotScored, TokenScores
from monitor.sinks.sources import LoopHealth, LoopSnapshot, LoopStats
from monitor.transport.meta import Segment
from monitor.transport.ring import RingError, RingReader, RingTotals, Slot

log = logging.getLogger("monitor.sidecar")


@dataclass
class RequestState:
    req: str
    request_id: str
    external_id: str
    sample: int
    n_prompt: int
    next_pos: int = 0
    uncovered: int = 0  # positions never computed (prefix-cache hits)
    rows: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    detectors: dict[str, DetectorState] = field(default_factory=dict)
    trace: RequestTrace | None = None
    step_time: float | None = None  # end of the last forward pass that brought rows

    def update(self, ds: DetectorState, *, fired_now: bool, final: bool, step_time: float | None = None) -> DetectorUpdate:
        return ds.snapshot(self.req, self.request_id, self.external_id, self.sample, fired_now=fired_now, final=final,
                           step_time=step_time)


class ScoreBus:
    """The in-process API: callbacks run on the sidecar's thread and must be quick."""

    def __init__(self) -> None:
        self._tokens: list[Callable[[TokenScores], None]] = []
        self._detectors: list[Callable[[DetectorUpdate], None]] = []
        self._slots: list[Callable[[SlotScored], None]] = []
        self._incidents: list[Callable[[Incident], None]] = []

    def on_incident(self, fn: Callable[[Incident], None]) -> None:
        self._incidents.append(fn)

    def emit_incident(self, incident: Incident) -> None:
        for fn in self._incidents:
            fn(incident)

    def on_slot(self, fn: Callable[[SlotScored], None]) -> None:
        self._slots.append(fn)

    def emit_slot(self, s: SlotScored) -> None:
        for fn in self._slots:
            fn(s)

    def on_tokens(self, fn: Callable[[TokenScores], None]) -> None:
        self._tokens.append(fn)

    def on_detector(self, fn: Callable[[DetectorUpdate], None]) -> None:
        self._detectors.append(fn)

    def emit_tokens(self, t: TokenScores) -> None:
        for fn in self._tokens:
            fn(t)

    def emit_detector(self, u: DetectorUpdate) -> None:
        for fn in self._detectors:
            fn(u)


class Sidecar:
    def __init__(self, loaded: LoadedConfig, device: str | None = None) -> None:
        self.loaded = loaded
        self.device = device
        self.detectors: DetectorSet = build_detector_set(loaded, device)
        self.bus = ScoreBus()
        self.stats = LoopStats()
        self.readers: dict[str, RingReader] = {}
        self.requests: dict[str, RequestState] = {}
        self._lock = threading.Lock()  # reload vs. the loop
        t = loaded.config.transport
        self.pattern = str(Path(t.directory) / f"{t.name}-*.ring")
        self.timeout = t.request_timeout_s
        # Fixed for the sidecar's life: traces in flight were made under them (a reload says so).
        inc = self.incidents = loaded.config.incidents
        self.budget = TraceBudget(inc.max_trace_tokens, inc.max_trace_tokens_total) if inc.enabled else None
        # Counters of rings already detached (a restarted vLLM makes a new ring): totals never go back.
        self.retired = RingTotals()
        self.heartbeat = time.monotonic()  # the loop's last iteration: liveness

    # ---- rings -----------------------------------------------------------------------------
    def discover(self) -> None:
        for path in glob.glob(self.pattern):
            if path in self.readers:
                continue
            try:
                reader = RingReader(path)
            except (RingError, OSError, ValueError) as e:
                log.warning("skipping ring %s: %s", path, e, extra={"ring": path, "error": str(e)})
                continue
            missing = set(self.detectors.layers) - set(reader.spec.layers)
            if missing:
                log.warning("ring %s carries layers %s; detectors need %s too", path, reader.spec.layers, sorted(missing),
                            extra={"ring": path, "layers": list(reader.spec.layers), "missing_layers": sorted(missing)})
            self.readers[path] = reader
            log.info("attached to ring %s (layers %s)", path, list(reader.spec.layers),
                     extra={"ring": path, "layers": list(reader.spec.layers), "producer_pid": reader.producer_pid})
        for path, reader in list(self.readers.items()):
            # A producer that exits unlinks its ring; our mapping stays valid, so drain it first.
            gone = reader.closed or not Path(path).exists()
            counters = reader.counters()
            if gone and counters["lag_slots"] == 0:
                with self._lock:  # a scrape sees the ring's totals live or retired, never both or neither
                    self.retired = self.retired + RingTotals.of(counters)
                    del self.readers[path]
                    reader.close()
                log.info("detached from ring %s", path, extra={"ring": path})

    def health(self) -> LoopHealth:
        """Liveness without the lock: a loop stuck while holding it is still reported as stalled."""
        return LoopHealth(max(0.0, time.monotonic() - self.heartbeat), len(self.detectors.detectors))

    def snapshot(self) -> LoopSnapshot:
        """Everything sinks may read about the loop, in one consistent view."""
        with self._lock:
            counters = [r.counters() for r in self.readers.values()]
            rings = sum((RingTotals.of(c) for c in counters), self.retired)
            return LoopSnapshot(
                stats=dataclasses.replace(self.stats), requests_in_flight=len(self.requests), rings=rings,
                rings_attached=len(counters), ring_lag_slots=sum(c["lag_slots"] for c in counters),
                ring_capacity_slots=sum(r.spec.slots for r in self.readers.values()),
                heartbeat_age_s=max(0.0, time.monotonic() - self.heartbeat), detectors=self.detectors,
                trace=None if self.budget is None else dataclasses.replace(self.budget))

    # ---- the loop ----------------------------------------------------------------------------
    def poll_once(self) -> int:
        n = 0
        with self._lock:
            for reader in list(self.readers.values()):
                for slot in reader.poll():
                    self._process(reader, slot)
                    n += 1
            self._expire()
        return n

    def run(self, stop: threading.Event, idle_sleep: float = 0.002, discover_every: float = 1.0) -> None:
        last_discover = 0.0
        while not stop.is_set():
            now = self.heartbeat = time.monotonic()
            if now - last_discover > discover_every:
                self.discover()
                last_discover = now
            if self.poll_once() == 0:
                time.sleep(idle_sleep)

    def _process(self, reader: RingReader, slot: Slot) -> None:
        self.stats.slots += 1
        meta = slot.meta
        if slot.rows and meta.segments:
            n_rows = slot.rows[0].shape[0]
            by_layer = {layer: slot.rows[i] for i, layer in enumerate(reader.spec.layers) if layer in self.detectors.layers}
            t0 = time.perf_counter()
            scores = {k: v.cpu().numpy() for k, v in self.detectors.scorer.score(by_layer).items()}
            took = time.perf_counter() - t0
            self.stats.tokens_scored += n_rows
            self.bus.emit_slot(SlotScored(n_rows, took, meta.t))
            rows = {layer: slot.rows[i] for i, layer in enumerate(reader.spec.layers)}
            for seg in meta.segments:
                self._segment(seg, scores, meta.t, rows, slot.token_ids)
        for req in meta.finished:
            self._finish(req)

    def _state(self, seg: Segment) -> RequestState:
        st = self.requests.get(seg.req)
        if st is None:
            st = RequestState(seg.req, seg.request_id, seg.external_id, seg.sample, seg.n_prompt)
            if self.budget is not None:
                st.trace = RequestTrace(self.incidents.context_window)
            self.requests[seg.req] = st
            self.stats.requests_seen += 1
        return st

    def _segment(self, seg: Segment, scores: dict[str, np.ndarray], step_time: float | None = None,
                 slot_rows: dict[int, torch.Tensor] | None = None, token_ids: np.ndarray | None = None) -> None:
        st = self._state(seg)
        st.last_seen = time.monotonic()
        st.step_time = step_time
        start, n, row = seg.start, seg.n, seg.row
        positions = np.arange(start, start + n)
        keep = positions >= st.next_pos  # preemption re-sends positions already scored
        self.stats.duplicate_rows += int((~keep).sum())
        if not keep.any():
            return
        if start > st.next_pos:  # prefix-cache hit: these positions had no forward pass
            st.uncovered += start - st.next_pos
            self.stats.uncovered_positions += start - st.next_pos
        positions = positions[keep]
        rows = slice(row, row + n)
        seg_scores = {head: s[rows][keep] for head, s in scores.items()}
        st.next_pos = int(positions[-1]) + 1
        st.rows += len(positions)
        self.bus.emit_tokens(TokenScores(st.req, st.request_id, st.external_id, st.sample, positions,
                                         positions < st.n_prompt, seg_scores))
        trace = st.trace
        if trace is not None:
            trace.add(self.budget, positions, None if token_ids is None else token_ids[rows][keep], seg_scores)
        for det in self.detectors.detectors:
            ds, fired = feed(det, st.detectors.get(det.spec.name), positions, st.n_prompt, seg_scores,
                             running=trace is not None)
            if ds is None:
                continue
            if trace is not None:
                trace.add_running(det.spec.name, ds.running_positions, ds.running)
            st.detectors[det.spec.name] = ds
            self.bus.emit_detector(st.update(ds, fired_now=fired, final=False, step_time=step_time))
        if trace is not None and slot_rows and self.detectors.context:
            sel = rows if keep.all() else torch.from_numpy(np.flatnonzero(keep) + row)
            rows_here = {layer: r[sel] for layer, r in slot_rows.items() if layer in self.detectors.context_layers}
            version = tuple(ds.top_version for ds in st.detectors.values())
            trace.keep_rows(positions, rows_here, version,
                            lambda: {p for ds in st.detectors.values() for _, p, _ in ds.top})

    def _finish(self, req: str, expired: bool = False) -> None:
        st = self.requests.pop(req, None)
        if st is None:
            return
        if expired:
            self.stats.requests_expired += 1
        else:
            self.stats.requests_finished += 1
        verdicts = [st.update(ds, fired_now=False, final=True) for ds in st.detectors.values()]
        for u in verdicts:
            self.bus.emit_detector(u)
        if st.trace is not None:
            if any(u.fired for u in verdicts):
                self.stats.incidents += 1
                self.bus.emit_incident(self._incident(st, verdicts))
            st.trace.release(self.budget)

    def _incident(self, st: RequestState, verdicts: list[DetectorUpdate]) -> Incident:
        """The request's trace, and the strongest SAE features at the tokens that drove a detector that fired."""
        trace, cfg = st.trace, self.incidents
        w = cfg.context_window
        wanted = sorted({e.position + d for u in verdicts if u.fired for e in u.evidence for d in range(-w, w + 1)}
                        & set(trace.rows))
        context: list[FeatureContext] = []
        for enc in self.detectors.context.values():
            have = [p for p in wanted if enc.layer in trace.rows[p]]
            if not have:
                continue
            try:
                values, indices = enc.top(torch.stack([trace.rows[p][enc.layer] for p in have]), cfg.top_features)
            except Exception:  # noqa: BLE001 - the incident goes out without this SAE's context, never not at all
                log.exception("feature context from SAE %s failed; the incident is sent without it", enc.name,
                              extra={"sae": enc.name, "request_id": st.request_id})
                continue
            for p, vals, idx in zip(have, values.tolist(), indices.tolist()):
                context.append(FeatureContext(p, enc.name, tuple((i, v) for i, v in zip(idx, vals) if v > 0)))
        columns = {name: head.columns for name, head in self.detectors.heads.items()}
        return Incident(st.req, st.request_id, st.external_id, st.sample, st.n_prompt, tuple(verdicts),
                        trace.arrays(columns), tuple(context), st.uncovered, trace.untraced, st.step_time)

    def _expire(self) -> None:
        now = time.monotonic()
        for req in [r for r, st in self.requests.items() if now - st.last_seen > self.timeout]:
            self._finish(req, expired=True)

    # ---- reload -------------------------------------------------------------------------------
    def reload(self, loaded: LoadedConfig) -> None:
        """Swap in new detectors, SAEs and probes without touching vLLM (the tap exports rows).

        Requests in flight keep a detector's aggregated state when what it measures (inputs,
        aggregation, combine, scope) is unchanged, now judged by the new definition (a new
        threshold applies at once); a detector that measures something else starts again with the
        next rows. Tapped layers cannot change here: that needs vLLM restarted.
        """
        new = build_detector_set(loaded, self.device)
        measures = ("inputs", "aggregation", "combine", "scope")
        with self._lock:
            if loaded.config.incidents != self.incidents:
                log.warning("incidents settings changed: they apply after a sidecar restart",
                            extra={"running": self.incidents.model_dump()})
            if loaded.config.tapped_layers != self.loaded.config.tapped_layers:
                log.warning("taps changed from %s to %s: restart vLLM for the tap to follow",
                            self.loaded.config.tapped_layers, loaded.config.tapped_layers)
            by_name = {d.spec.name: d for d in new.detectors}
            for st in self.requests.values():
                kept = {}
                for name, ds in st.detectors.items():
                    nd = by_name.get(name)
                    old = ds.detector.spec
                    if nd is not None and all(getattr(nd.spec, k) == getattr(old, k) for k in measures):
                        ds.detector = nd
                        kept[name] = ds
                st.detectors = kept
            self.detectors = new
            self.loaded = loaded
            self.stats.reloads_ok += 1
            self.stats.last_reload_ok = True
            self.stats.config_loaded_at = time.time()

    def reload_failed(self) -> None:
        """A new config was rejected: the running one stays, and the failure is counted."""
        self.stats.reloads_failed += 1
        self.stats.last_reload_ok = False

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.readers.clear()

