"""The sidecar's loop: read the rings, score rows, keep per-request detector state, publish.

Per poll, each slot's rows (all requests of a step) are scored in one pass, then split among its
requests and fed to every detector with array operations over all of them at once: per-request
state lives in arrays indexed by a request slot (`SlotTable`, `DetectorBank`, `TraceStore`), so a
decode step of hundreds of requests costs a few operations per detector, not a few per request.
Python touches a request on its own only when it starts, fires, ends or gains new evidence.

Per-request state is bounded (detector aggregators are O(window), evidence is the top few tokens)
and released when vLLM reports the request finished or after `transport.request_timeout_s` without
rows; at most `sampling.max_requests` are tracked at once, and a request beyond that (or sampled
out by `sampling`) is not scored at all, and counted. A request's positions arrive in order; rows
for positions already seen (a preempted request being recomputed, a second copy of a row) are
ignored, and positions never computed (prefix-cache hits) are counted as not covered rather than
invented. Rows of a request vLLM said had finished are ignored and counted (a second producer's
copy, a late slot).

With `incidents.enabled`, each request also keeps a bounded trace (`monitor.detectors.trace`); when a
request on which a detector fired finishes, it becomes an `Incident`, with the strongest features of
a full SAE encode at the tokens that drove each detector. Other traces are released at the end.

Consumers subscribe to the `ScoreBus`: each slot's token scores, detector fires and verdicts, incidents.
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from monitor.config.load import ConfigError, ConfigIssue, LoadedConfig
from monitor.detectors.runtime import DetectorBank, DetectorSet, build_detector_set, scope_batch
from monitor.detectors.trace import FeatureContext, Incident, TraceBudget, TraceStore
from monitor.detectors.updates import DetectorUpdate
from monitor.scoring.staging import DeviceStager, Staged
from monitor.scoring.tokens import SlotScored, TokenScores
from monitor.sidecar.requests import RequestInfo, SlotTable
from monitor.sidecar.sampling import Sampler
from monitor.transport.pinned import PinnedReader
from monitor.sinks.sources import LoopHealth, LoopSnapshot, LoopStats
from monitor.transport.meta import SegmentTable, parse_request_id
from monitor.transport.ring import RingError, RingReader, RingTotals, Slot, peek_write_seq

log = logging.getLogger("monitor.sidecar")

# Config sections the sidecar reads once, at start: a reload that changes them says so.
RESTART_ONLY = ("model", "scoring", "sampling", "transport", "sinks", "incidents", "evidence", "store", "console",
                "enforcement", "drift", "deployment")


class ScoreBus:
    """The in-process API: callbacks run on the sidecar's thread and must be quick."""

    def __init__(self) -> None:
        self._tokens: list[Callable[[TokenScores], None]] = []
        self._detectors: list[Callable[[DetectorUpdate], None]] = []
        self._slots: list[Callable[[SlotScored], None]] = []
        self._incidents: list[Callable[[Incident], None]] = []
        self._ends: list[Callable[[str], None]] = []

    def on_request_end(self, fn: Callable[[str], None]) -> None:
        """`fn(external id)` once vLLM reports a request finished (or it timed out), after its verdicts; the
        external id is the one vLLM's API server knows the request by (what `abort` takes)."""
        self._ends.append(fn)

    def emit_request_end(self, external_id: str) -> None:
        for fn in self._ends:
            fn(external_id)

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
        self.stager = DeviceStager(self.detectors.scorer.device)  # the device is fixed for the sidecar's life
        self.bus = ScoreBus()
        self.stats = LoopStats()
        self.readers: dict[str, RingReader] = {}
        self._lock = threading.Lock()  # reload vs. the loop
        cfg = loaded.config
        t = cfg.transport
        self.pattern = str(Path(t.directory) / f"{t.name}-*.ring")
        self.timeout = t.request_timeout_s
        self.table = SlotTable(cfg.sampling.max_requests)
        self.table.on_grow.append(self._grow)
        self.banks = {d.spec.name: DetectorBank(d, self.table.capacity) for d in self.detectors.detectors}
        self.sampler = Sampler(cfg.sampling, PinnedReader(t.directory, t.name))
        self.skipped: dict[str, float] = {}  # req -> last seen: requests not scored (sampled out, over the limit)
        self._last_sweep = time.monotonic()
        # Fixed for the sidecar's life: traces in flight were made under them (a reload says so).
        inc = self.incidents = cfg.incidents
        self.budget = TraceBudget(inc.max_trace_tokens, inc.max_trace_tokens_total) if inc.enabled else None
        self.traces = TraceStore(self.budget, inc.context_window, self.table.capacity,
                                 inc.max_context_rows) if inc.enabled else None
        # Counters of rings already detached (a restarted vLLM makes a new ring): totals never go back.
        self.retired = RingTotals()
        self.dead: dict[str, tuple[int, int] | None] = {}  # rings let go of because their producer died
        self.bad_rings: dict[str, str] = {}  # rings that cannot be opened, with why (logged once)
        self._usable: dict[tuple[int, int], str | None] = {}  # (reader, detector set) -> why it cannot be scored
        self.taps_off = 0  # producers that could not make their ring (`.off` markers)
        self.heartbeat = time.monotonic()  # the loop's last iteration: liveness

    @property
    def requests(self) -> dict[str, RequestInfo]:
        """Requests tracked now, by the engine's id."""
        return self.table.by_req

    def _grow(self, capacity: int) -> None:
        for bank in self.banks.values():
            bank.grow(capacity)
        if self.traces is not None:
            self.traces.grow(capacity)

    # ---- rings -----------------------------------------------------------------------------
    def discover(self) -> None:
        for path in glob.glob(self.pattern):
            reader = self.readers.get(path)
            if reader is not None:
                if _inode(path) not in (None, reader.inode):  # a restarted producer replaced it under this name
                    self._detach(path, "replaced")
                else:
                    continue
            if path in self.dead and self.dead[path] == _ring_state(path):
                continue  # its producer is gone and nothing changed since we let go of it
            self.dead.pop(path, None)
            try:
                reader = RingReader(path, pin_memory=self.detectors.scorer.device.type == "cuda")
            except (RingError, OSError, ValueError) as e:
                if self.bad_rings.get(path) != str(e):  # once per ring and reason, not every second
                    self.bad_rings[path] = str(e)
                    log.error("cannot read ring %s: %s", path, e, extra={"ring": path, "error": str(e)})
                continue
            self.bad_rings.pop(path, None)
            self.readers[path] = reader
            log.info("attached to ring %s (layers %s)", path, list(reader.spec.layers),
                     extra={"ring": path, "layers": list(reader.spec.layers), "producer_pid": reader.producer_pid})
            why = self._unusable(reader)
            if why:
                log.error("ring %s cannot feed the detectors: %s; its slots are skipped and counted", path, why,
                          extra={"ring": path, "error": why})
        for path in [p for p in self.bad_rings if not Path(p).exists()]:
            del self.bad_rings[path]
        for path, reader in list(self.readers.items()):
            # A producer that exits unlinks its ring; our mapping stays valid, so drain it first.
            gone = reader.closed or not Path(path).exists()
            if gone and reader.counters()["lag_slots"] == 0:
                self._detach(path, "closed")
            elif not gone and _producer_dead(reader, self.timeout):
                # Killed without closing its ring (SIGKILL, OOM): nothing more will come.
                self._detach(path, "producer_dead")
                self.dead[path] = _ring_state(path)
        self.taps_off = len(glob.glob(str(Path(self.pattern).with_suffix(".off"))))

    def _detach(self, path: str, why: str) -> None:
        reader = self.readers[path]
        counters = reader.counters()
        with self._lock:  # a scrape sees the ring's totals live or retired, never both or neither
            self.retired = self.retired + RingTotals.of(counters)
            del self.readers[path]
            self._usable = {k: v for k, v in self._usable.items() if k[0] != id(reader)}
            reader.close()
        log.info("detached from ring %s (%s)", path, why, extra={"ring": path, "reason": why})

    def _unusable(self, reader: RingReader, ds: DetectorSet | None = None) -> str | None:
        """Why this ring's rows cannot be scored by `ds` (default: the detectors in force); None: they can."""
        ds = ds or self.detectors
        missing = sorted(set(ds.layers) - set(reader.spec.layers))
        if missing:
            return f"it carries layers {list(reader.spec.layers)}, the detectors need {missing} too (restart vLLM " \
                   "with the taps of this config)"
        for layer, scorer in ds.scorer.layers.items():
            if scorer.d_in is not None and scorer.d_in != reader.spec.d_model:
                return f"its rows are {reader.spec.d_model} wide, the heads of layer {layer} read {scorer.d_in} " \
                       "(SAEs or probes of another model?)"
        return None

    def health(self) -> LoopHealth:
        """Liveness without the lock: a loop stuck while holding it is still reported as stalled."""
        return LoopHealth(max(0.0, time.monotonic() - self.heartbeat), len(self.detectors.detectors))

    def snapshot(self) -> LoopSnapshot:
        """Everything sinks may read about the loop, in one consistent view."""
        with self._lock:
            counters = [r.counters() for r in self.readers.values()]
            rings = sum((RingTotals.of(c) for c in counters), self.retired)
            stats = dataclasses.replace(self.stats, slots_skipped=dict(self.stats.slots_skipped))
            return LoopSnapshot(
                stats=stats, requests_in_flight=len(self.requests), rings=rings,
                rings_attached=len(counters), ring_lag_slots=sum(c["lag_slots"] for c in counters),
                ring_capacity_slots=sum(r.spec.slots for r in self.readers.values()),
                heartbeat_age_s=max(0.0, time.monotonic() - self.heartbeat), detectors=self.detectors,
                trace=None if self.budget is None else dataclasses.replace(self.budget), taps_off=self.taps_off)

    # ---- the loop ----------------------------------------------------------------------------
    def poll_once(self) -> int:
        n = 0
        with self._lock:
            for reader in list(self.readers.values()):
                # Slots are read 8 at a time (lent in place, or copied into the reader's reused buffers).
                key = (id(reader), id(self.detectors))
                if key not in self._usable:
                    self._usable[key] = self._unusable(reader)
                unusable = self._usable[key]
                polled = reader.poll(8, reuse=True)
                # On a GPU every slot's copy starts now, on a side stream: slot k+1 moves while slot k is worked on.
                staged = [None if unusable else self.stager.stage(slot.rows) for slot in polled]
                for slot, rows in zip(polled, staged):
                    n += 1
                    if unusable:
                        self._skip(slot, "unusable_ring", unusable)
                    else:
                        try:
                            self._process(reader, slot, rows)
                        except Exception as e:  # noqa: BLE001 - one bad slot must not stop the monitor
                            self._skip(slot, "error", f"{type(e).__name__}: {e}")
                            if self.stats.slots_skipped.get("error", 0) <= 10:
                                log.exception("scoring a slot failed; skipped")
                    # Done with its rows: a lent slot goes back to the producer now, not at the next poll.
                    reader.release(slot.seq)
            self._expire()
        return n

    def _skip(self, slot: Slot, reason: str, why: str) -> None:
        """A slot that cannot be scored: counted; its finished requests still end (and give their verdicts)."""
        skipped = self.stats.slots_skipped
        skipped[reason] = skipped.get(reason, 0) + 1
        if reason != "error" and (skipped[reason] <= 3 or skipped[reason] % 1000 == 0):
            log.error("slot %d skipped (%s): %s", slot.seq, reason, why,
                      extra={"reason": reason, "error": why, "skipped": skipped[reason]})
        for req in slot.meta.finished:
            try:
                self._finish(req)
            except Exception:  # noqa: BLE001
                log.exception("finishing request %s failed", req)

    def run(self, stop: threading.Event, idle_sleep: float = 0.002, discover_every: float = 1.0) -> None:
        # What exists now (torch, the SAEs and probes, the config) lives as long as the process: a full
        # garbage collection need not walk it. Unfrozen, each one walked the whole heap, several times
        # a second at decode rates (~3 ms a slot, measured: bench/fleet.py). vLLM does the same after start.
        gc.freeze()
        last_discover = 0.0
        while not stop.is_set():
            now = self.heartbeat = time.monotonic()
            try:
                if now - last_discover > discover_every:
                    last_discover = now
                    self.discover()
                if self.poll_once() == 0:
                    time.sleep(idle_sleep)
            except Exception:  # noqa: BLE001 - slots are guarded one by one; this is the last line of defence
                log.exception("scoring loop error; carrying on")
                time.sleep(0.1)

    def _process(self, reader: RingReader, slot: Slot, staged: Staged) -> None:
        self.stats.slots += 1
        meta = slot.meta
        if slot.rows and meta.n_segments:
            self._rows(reader, slot, self.stager.ready(staged))
        for req in meta.finished:
            self._finish(req)

    def _admit(self, seg: SegmentTable) -> np.ndarray:
        """Each segment's request slot; -1 for a request that is not scored (sampled out, over the
        limit, or already ended)."""
        out = np.empty(len(seg), dtype=np.int64)
        by_req, now = self.table.by_req, time.monotonic()
        for i, req in enumerate(seg.req):
            info = by_req.get(req)
            if info is not None:
                out[i] = info.slot
                continue
            out[i] = -1
            if req in self.skipped:
                self.skipped[req] = now
                continue
            if req in self.table.ended:
                self.stats.late_rows += int(seg.n[i])
                continue
            external_id, request_id, sample = seg.ids(i)
            if not self.sampler.admit(request_id):
                self.skipped[req] = now
                self.stats.requests_sampled_out += 1
            else:
                info = self.table.open(req, request_id, external_id, sample, int(seg.n_prompt[i]))
                if info is None:
                    self.skipped[req] = now
                    self.stats.requests_over_limit += 1
                    continue
                out[i] = info.slot
                self.stats.requests_seen += 1
                # The banks need no reset here: a slot is freed only by `_finish`, which resets them.
                if self.traces is not None:
                    self.traces.open(np.array([info.slot]))
        return out

    def _rows(self, reader: RingReader, slot: Slot, rows: list[torch.Tensor]) -> None:
        """`rows`: the slot's rows per layer, on the scoring device (`DeviceStager`)."""
        meta = slot.meta
        seg = meta.table()
        slots = self._admit(seg)
        tracked = slots >= 0
        if not tracked.any():
            return
        layers = reader.spec.layers
        row, n = seg.row, seg.n
        token_ids = slot.token_ids
        rows_by_layer = {layer: rows[i] for i, layer in enumerate(layers)}
        if not tracked.all():  # score only the rows of requests that are tracked
            row, n = row[tracked], n[tracked]
            take = _ranges(row, n)
            index = torch.from_numpy(take).to(rows[0].device)
            rows_by_layer = {layer: t[index] for layer, t in rows_by_layer.items()}
            token_ids = None if token_ids is None else token_ids[take]
            row = np.cumsum(n) - n
        slots, start, n_prompt = slots[tracked], seg.start[tracked], seg.n_prompt[tracked]
        n_rows = int(n.sum())
        t0 = time.perf_counter()
        scores = _to_host(self.detectors.scorer.score(
            {layer: t for layer, t in rows_by_layer.items() if layer in self.detectors.layers}))
        bad = _nonfinite(scores)  # a NaN would blind max/mean/EMA for the rest of the request: left out
        if bad is not None:
            self.stats.nonfinite_rows += int(bad.sum())
            scores = {h: np.where(bad[:, None], np.nan, s) for h, s in scores.items()}  # NaN: "no score" in traces
        self.stats.tokens_scored += n_rows
        self.bus.emit_slot(SlotScored(n_rows, time.perf_counter() - t0, meta.t))

        # Split among requests: positions at or past each request's next one are new; earlier ones
        # were scored already (preemption, a second copy); a gap was never computed (prefix cache).
        table = self.table
        expected = table.next_pos[slots]
        first_pos = np.maximum(start, expected)
        count = np.maximum(0, start + n - first_pos)
        self.stats.duplicate_rows += int((n - count).sum())
        gap = np.where(count > 0, np.maximum(0, start - expected), 0)
        table.uncovered[slots] += gap
        self.stats.uncovered_positions += int(gap.sum())
        table.next_pos[slots] = np.where(count > 0, start + n, expected)
        table.rows[slots] += count
        table.last_seen[slots] = time.monotonic()
        table.step_time[slots] = np.nan if meta.t is None else meta.t
        positions = np.empty(n_rows, dtype=np.int64)
        prompt_end = np.empty(n_rows, dtype=np.int64)
        where = _ranges(row, n)
        positions[where] = _ranges(start, n)
        prompt_end[where] = np.repeat(n_prompt, n)
        live = count > 0
        if not live.all():
            slots, first_pos, count = slots[live], first_pos[live], count[live]
            n_prompt, row, start = n_prompt[live], row[live], start[live]
        if not len(slots):
            return
        first = row + first_pos - start  # each request's first new row
        if int(count.sum()) == n_rows and bad is None:  # every row is new and finite (the usual case): no copies
            self.bus.emit_tokens(TokenScores(positions, positions < prompt_end, scores))
        else:
            new = _ranges(first, count)
            new = new if bad is None else new[~bad[new]]
            self.bus.emit_tokens(TokenScores(positions[new], positions[new] < prompt_end[new],
                                             {h: s[new] for h, s in scores.items()}))

        traces = self.traces
        entries = None
        if traces is not None:
            entries = traces.add(slots, first, count, positions, token_ids, scores)
        changed: set[int] = set()
        pieces = [(slots, first, first_pos, count, n_prompt)] if bad is None else \
            _finite_pieces(slots, first, first_pos, count, n_prompt, bad)
        for bank in self.banks.values():
            for p_slots, p_first, p_pos, p_count, p_prompt in pieces:
                found = scope_batch(bank.spec, p_slots, p_first, p_pos, p_count, p_prompt)
                if found is None:
                    continue
                batch, _ = found
                step = bank.update(batch, positions, scores, running=traces is not None)
                if traces is not None:
                    traces.add_running(bank.spec.name, entries[batch.index[batch.mask]], step.running[batch.mask])
                    changed.update(batch.slots[step.changed].tolist())
                for k in step.fired.tolist():
                    info = table.info[int(batch.slots[k])]
                    self.bus.emit_detector(bank.snapshot(info.slot, info.req, info.request_id, info.external_id,
                                                         info.sample, fired_now=True, final=False, step_time=meta.t))
                for k in step.escalated.tolist():  # an alert recorded earlier reached the page tier
                    info = table.info[int(batch.slots[k])]
                    self.bus.emit_detector(bank.snapshot(info.slot, info.req, info.request_id, info.external_id,
                                                         info.sample, fired_now=False, final=False, step_time=meta.t,
                                                         escalated_now=True))
        if traces is not None and self.detectors.context:
            context = {layer: t for layer, t in rows_by_layer.items() if layer in self.detectors.context_layers}
            traces.keep_rows(slots, first, count, positions, context, changed, self._evidence_positions,
                             lambda slot: any(b.fired[slot] for b in self.banks.values()))

    def _evidence_positions(self, slot: int) -> set[int]:
        return set().union(*(b.top_positions(slot) for b in self.banks.values() if b.active[slot]))

    def _finish(self, req: str, expired: bool = False) -> None:
        info = self.table.by_req.get(req)
        if info is None:
            if self.skipped.pop(req, None) is not None:
                self.table.remember_ended(req)
            elif req not in self.table.ended:
                # Its end came but none of its rows: every slot that carried them was dropped (the ring was
                # full), or it ran before this sidecar attached. It gets no verdict; counted, never silent.
                self.stats.requests_no_rows += 1
                self.table.remember_ended(req)
            self.bus.emit_request_end(parse_request_id(req)[0])
            return
        if expired:
            self.stats.requests_expired += 1
        else:
            self.stats.requests_finished += 1
        slot = info.slot
        step_time = float(self.table.step_time[slot])
        verdicts = [bank.snapshot(slot, info.req, info.request_id, info.external_id, info.sample, fired_now=False,
                                  final=True) for bank in self.banks.values() if bank.active[slot]]
        for u in verdicts:
            self.bus.emit_detector(u)
        slots = np.array([slot])
        if self.traces is not None:
            if any(u.fired for u in verdicts):
                self.stats.incidents += 1
                self.bus.emit_incident(self._incident(info, verdicts, None if np.isnan(step_time) else step_time))
            self.traces.release(slots)
        for bank in self.banks.values():
            bank.reset(slots)
        self.table.close(req, ended=not expired)
        self.bus.emit_request_end(info.external_id)

    def _incident(self, info: RequestInfo, verdicts: list[DetectorUpdate], end_time: float | None) -> Incident:
        """The request's trace, and the strongest SAE features at the tokens that drove a detector that fired."""
        traces, cfg, slot = self.traces, self.incidents, info.slot
        kept_rows = traces.rows.get(slot, {})
        w = cfg.context_window
        wanted = sorted({e.position + d for u in verdicts if u.fired for e in u.evidence for d in range(-w, w + 1)}
                        & set(kept_rows))
        context: list[FeatureContext] = []
        for enc in self.detectors.context.values():
            have = [p for p in wanted if enc.layer in kept_rows[p]]
            if not have:
                continue
            try:
                values, indices = enc.top(torch.stack([kept_rows[p][enc.layer] for p in have]), cfg.top_features)
            except Exception:  # noqa: BLE001 - the incident goes out without this SAE's context, never not at all
                log.exception("feature context from SAE %s failed; the incident is sent without it", enc.name,
                              extra={"sae": enc.name, "request_id": info.request_id})
                continue
            for p, vals, idx in zip(have, values.tolist(), indices.tolist()):
                context.append(FeatureContext(p, enc.name, tuple((i, v) for i, v in zip(idx, vals) if v > 0)))
        columns = {name: head.columns for name, head in self.detectors.heads.items()}
        return Incident(info.req, info.request_id, info.external_id, info.sample, info.n_prompt, tuple(verdicts),
                        traces.arrays(slot, columns), tuple(context), int(self.table.uncovered[slot]),
                        int(traces.untraced[slot]), end_time)

    def _expire(self) -> None:
        now = time.monotonic()
        table = self.table
        for slot in np.flatnonzero(table.in_use & (now - table.last_seen > self.timeout)).tolist():
            self._finish(table.info[slot].req, expired=True)
        if now - self._last_sweep > 1.0:  # requests never scored leave no state but their name: swept now and then
            self._last_sweep = now
            for req in [r for r, seen in self.skipped.items() if now - seen > self.timeout]:
                del self.skipped[req]

    # ---- reload -------------------------------------------------------------------------------
    def reload(self, loaded: LoadedConfig) -> None:
        """Swap in new detectors, SAEs and probes without touching vLLM (the tap exports rows).

        Requests in flight keep a detector's aggregated state when what it measures (inputs,
        aggregation, combine, scope) is unchanged, now judged by the new definition (a new
        threshold applies at once); a detector that measures something else starts again with the
        next rows. Tapped layers cannot change here: that needs vLLM restarted.
        """
        new = build_detector_set(loaded, self.device)
        self._check_scorable(loaded, new)
        measures = ("inputs", "aggregation", "combine", "scope")
        running, edited = self.loaded.config, loaded.config
        pending = [name for name in RESTART_ONLY if getattr(edited, name) != getattr(running, name)]
        with self._lock:
            if pending:
                log.warning("config reloaded, but %s changed: those settings apply after a sidecar restart "
                            "(until then the running ones stay)", ", ".join(pending), extra={"restart_required": pending})
            self.stats.restart_required = pending
            if edited.tapped_layers != running.tapped_layers:
                log.warning("taps changed from %s to %s: restart vLLM for the tap to follow",
                            running.tapped_layers, edited.tapped_layers)
            banks = {}
            for det in new.detectors:
                old = self.banks.get(det.spec.name)
                if old is not None and old.spec.mode != det.spec.mode:  # the record of when a detector went live
                    log.info("detector %s: %s -> %s", det.spec.name, old.spec.mode, det.spec.mode,
                             extra={"detector": det.spec.name, "mode_from": old.spec.mode, "mode": det.spec.mode})
                if old is not None and all(getattr(det.spec, k) == getattr(old.spec, k) for k in measures):
                    old.adopt(det)
                    banks[det.spec.name] = old
                else:
                    banks[det.spec.name] = DetectorBank(det, self.table.capacity)
            self.banks = banks
            self.detectors = new
            self._usable = {}
            self.loaded = loaded
            self.stats.reloads_ok += 1
            self.stats.last_reload_ok = True
            self.stats.config_loaded_at = time.time()
            gc.freeze()  # the new detectors and weights, as at start

    def _check_scorable(self, loaded: LoadedConfig, new: DetectorSet) -> None:
        """Refuse, before anything changes, detectors that the rings (or the running taps) cannot feed."""
        issues = [ConfigIssue(loaded.path, "detectors", f"ring {path}: {why}")
                  for path, reader in self.readers.items() if (why := self._unusable(reader, new))]
        if not self.readers:
            tapped = set(self.loaded.config.tapped_layers)
            missing = sorted(set(new.layers) - tapped)
            if missing:
                issues.append(ConfigIssue(loaded.path, "detectors", f"they read layers {missing}, vLLM taps only "
                                          f"{sorted(tapped)}: restart vLLM with this config's taps first"))
        if issues:
            raise ConfigError(issues)

    def reload_failed(self) -> None:
        """A new config was rejected: the running one stays, and the failure is counted."""
        self.stats.reloads_failed += 1
        self.stats.last_reload_ok = False

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.readers.clear()


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _ring_state(path: str) -> tuple[int, int] | None:
    """What says a ring moved on: its file and how many slots it has published."""
    inode, seq = _inode(path), peek_write_seq(path)
    return None if inode is None or seq is None else (inode, seq)


PRODUCER_GRACE_S = 10.0


def _producer_dead(reader: RingReader, timeout: float) -> bool:
    """The producer's pid is gone and it has not published for a while. The pid is only meaningful when the
    sidecar shares vLLM's pid namespace; when it does not, an idle ring is let go of and attached again,
    where it was left, at its next slot (`dead` remembers its state)."""
    c = reader.counters()
    if time.time_ns() - max(c["heartbeat_ns"], reader.created_ns) < min(timeout, PRODUCER_GRACE_S) * 1e9:
        return False
    try:
        os.kill(reader.producer_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _nonfinite(scores: dict[str, np.ndarray]) -> np.ndarray | None:
    """[rows] bool: rows with a NaN or infinite score in any head; None when every row is finite (the usual
    case, checked in one pass per head)."""
    bad = None
    for s in scores.values():
        if not np.isfinite(s).all():
            row_bad = ~np.isfinite(s).all(axis=1)
            bad = row_bad if bad is None else bad | row_bad
    return bad if bad is not None and bad.any() else None


def _finite_pieces(slots, first, first_pos, count, n_prompt, bad: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Each request's new rows cut around its non-finite ones into runs of consecutive positions, as rounds
    of (slots, first row, first position, count, prompt length): round k holds every request's k-th run,
    so a detector sees a request's runs in order, once each. Only a poll with a bad row takes this path."""
    runs: list[list[tuple[int, int, int]]] = []
    for f, p, c in zip(first.tolist(), first_pos.tolist(), count.tolist()):
        ok = ~bad[f : f + c]
        if ok.all():
            runs.append([(f, p, c)])
            continue
        edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
        runs.append([(f + a, p + a, e - a) for a, e in zip(edges[::2].tolist(), edges[1::2].tolist())])
    rounds = []
    for k in range(max((len(r) for r in runs), default=0)):
        which = np.array([i for i, r in enumerate(runs) if len(r) > k], dtype=np.int64)
        if not len(which):
            continue
        f, p, c = (np.array([runs[i][k][j] for i in which], dtype=np.int64) for j in range(3))
        rounds.append((slots[which], f, p, c, n_prompt[which]))
    return rounds


def _to_host(scores: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every head's scores as numpy arrays: from a GPU in one copy (one wait), not one per head."""
    if not scores:
        return {}
    first = next(iter(scores.values()))
    if first.device.type == "cpu":
        return {k: v.numpy() for k, v in scores.items()}
    flat = torch.cat([v.float() for v in scores.values()], dim=1).cpu().numpy()
    out, at = {}, 0
    for k, v in scores.items():
        out[k] = flat[:, at : at + v.shape[1]]
        at += v.shape[1]
    return out


def _ranges(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of arange(first[i], first[i] + counts[i])."""
    total = int(counts.sum())
    return np.repeat(first - (np.cumsum(counts) - counts), counts) + np.arange(total)
