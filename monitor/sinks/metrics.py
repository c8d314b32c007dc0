"""Prometheus metrics of the sidecar, and its HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).

Conventions (docs/metrics.md lists every series): one prefix, base units, `_total` counters, bounded
labels (`model_name` equal to vLLM's, `detector`, `severity`, `feature`, `reason`/`outcome`), never a
request id. Counters the loop already keeps (tokens, requests, ring and Kafka counters) are read at
scrape time by a collector, so the scoring path pays nothing for them; what only exists as an event
(fires, verdicts, latencies, activations) is recorded as it happens. Watched-feature activations
arrive thousands of rows at a time, so they go into numpy-bucketed histograms (one `searchsorted`
per batch) rather than one `observe()` call per value.

Readiness never depends on Kafka: a broker outage must not take the vLLM pod out of its Service.
"""

from __future__ import annotations

import logging
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from monitor.detectors.drift import DriftTracker
from monitor.detectors.runtime import DetectorSet
from monitor.detectors.updates import DetectorUpdate
from monitor.scoring.space import sigmoid
from monitor.scoring.tokens import SlotScored, TokenScores
from monitor.sinks.kafka import KafkaStats
from monitor.sinks.reply import severity_for
from monitor.sinks.sources import LoopHealth, LoopSnapshot
from monitor.transport.control import SenderStats
from monitor.sinks import strict_json

log = logging.getLogger("monitor.metrics")

PREFIX = "misalignment_monitor"
# SAE activations are non-negative and heavy-tailed; the 0 bucket counts the (many) inactive tokens.
FEATURE_BUCKETS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
PROBABILITY_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
# Detector score / threshold: 1.0 is the firing line, whatever the detector's units.
RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def package_version() -> str:
    try:
        return version("misalignment-monitor")
    except PackageNotFoundError:
        return "unknown"


class BulkHistogram:
    """Histograms over a fixed label set, fed whole arrays at a time; exposed by `MonitorCollector`."""

    def __init__(self, name: str, doc: str, label_names: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.label_names = name, doc, label_names
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], list] = {}  # labels -> [bucket counts (+Inf last), sum]

    def ensure(self, labels: tuple[str, ...]) -> None:
        with self._lock:
            self._series.setdefault(labels, [np.zeros(len(self.bounds) + 1, dtype=np.int64), 0.0])

    def observe_many(self, labels: tuple[str, ...], values: np.ndarray) -> None:
        self.observe_columns([labels], values.reshape(-1, 1))

    def observe_columns(self, labels: list[tuple[str, ...]], values: np.ndarray) -> None:
        """Column j of `values` [n, k] into the series `labels[j]`: one pass for every column (a slot's
        64 watched features cost one searchsorted, not 64). Non-finite values are skipped."""
        nb, k = len(self.bounds) + 1, values.shape[1]
        finite = np.isfinite(values)
        clean = np.where(finite, values, 0.0)
        # value <= bound[i] lands in bucket i: the number of bounds below it. One comparison per bound
        # (a dozen) is 2-3x quicker than a binary search per value (searchsorted) for thousands of values.
        idx = np.zeros(values.shape, dtype=np.int64)
        for bound in self.bounds:
            idx += clean > bound
        counts = np.bincount((idx + np.arange(k) * nb)[finite], minlength=nb * k).reshape(k, nb)
        sums = clean.sum(axis=0, dtype=np.float64)
        with self._lock:
            for j, key in enumerate(labels):
                series = self._series.get(key)
                if series is None:
                    series = self._series[key] = [np.zeros(nb, dtype=np.int64), 0.0]
                series[0] += counts[j]
                series[1] += float(sums[j])

    def collect(self) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(self.name, self.doc, labels=list(self.label_names))
        with self._lock:
            items = [(k, v[0].copy(), v[1]) for k, v in self._series.items()]
        for labels, counts, total in items:
            cum = np.cumsum(counts)
            buckets = [(_fmt(b), float(c)) for b, c in zip(self.bounds, cum[:-1])] + [("+Inf", float(cum[-1]))]
            fam.add_metric(list(labels), buckets, total)
        return fam


def _fmt(x: float) -> str:
    return repr(float(x))


class MonitorCollector(Collector):
    """Everything read from the sidecar's own counters at scrape time."""

    def __init__(self, metrics: "SidecarMetrics") -> None:
        self.m = metrics

    def collect(self) -> Iterable:
        m = self.m
        snap = m.snapshot()
        m.follow(snap.detectors)  # a reload's new detectors are exported at 0 before their first token
        model = m.model_name
        st = snap.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            fam = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["model_name"])
            fam.add_metric([model], value)
            return fam

        def by_label(name: str, doc: str, label: str, values: dict[str, float]) -> CounterMetricFamily:
            fam = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["model_name", label])
            for v, x in values.items():
                fam.add_metric([model, v], x)
            return fam

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            fam = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["model_name"])
            fam.add_metric([model], value)
            return fam

        info = GaugeMetricFamily(f"{PREFIX}_build_info", "Version of the monitor and where it scores (cpu, cuda); "
                                 "always 1.", labels=["version", "model_name", "scoring_device"])
        info.add_metric([m.version, model, snap.detectors.scorer.device.type], 1)
        yield info
        yield counter("tokens_scored", "Token rows scored by the sidecar (prompt and generated).", st.tokens_scored)
        yield counter("requests_scored", "Requests whose rows reached the sidecar.", st.requests_seen)
        yield by_label("requests_completed", "Requests whose state was released, by reason.", "reason",
                       {"finished": st.requests_finished, "timed_out": st.requests_expired})
        yield gauge("requests_in_flight", "Requests with detector state held by the sidecar.", snap.requests_in_flight)
        yield counter("positions_not_covered", "Token positions vLLM never computed (prefix-cache hits), so never scored.",
                      st.uncovered_positions)
        yield counter("duplicate_rows", "Rows for positions already scored (preempted requests recomputed); ignored.",
                      st.duplicate_rows)
        yield by_label("requests_not_scored", "Requests never scored, by reason: left out by `sampling.fraction`, "
                       "over `sampling.max_requests` tracked at once, or no_rows: the request's end arrived but none "
                       "of its rows (a full ring dropped every one, or it ran before the sidecar attached).", "reason",
                       {"sampled_out": st.requests_sampled_out, "over_limit": st.requests_over_limit,
                        "no_rows": st.requests_no_rows})
        yield counter("late_rows", "Rows of a request that had already ended (a late or second copy); ignored.",
                      st.late_rows)
        yield counter("nonfinite_rows", "Rows whose scores held NaN or infinity (a broken model or SAE); each was left "
                      "out of every detector, the request's other rows were scored.", st.nonfinite_rows)
        yield counter("slots_read", "Ring slots read by the sidecar.", st.slots)
        yield counter("incidents", "Fired requests that finished and became an incident (with their trace).",
                      st.incidents)
        if snap.trace is not None:
            yield gauge("trace_tokens", "Tokens held in the traces of requests in flight.", snap.trace.used)
            yield by_label("trace_tokens_dropped", "Scored tokens not kept in a trace, by the cap that was hit "
                           "(trace_cap: incidents.max_trace_tokens; total_cap: incidents.max_trace_tokens_total).",
                           "reason", {"trace_cap": snap.trace.capped_request, "total_cap": snap.trace.capped_total})
            yield gauge("context_rows", "Residual rows held for incidents' feature context (`incidents.max_context_rows`).",
                        snap.trace.context_rows)
            yield by_label("context_rows_dropped", "Evidence rows not kept for feature context, by reason: evicted (a "
                           "request that had not fired made room) or full (the budget held only fired requests' rows).",
                           "reason", {"evicted": snap.trace.context_evicted, "full": snap.trace.context_dropped})

        # The producers' counters live in the rings' shared-memory headers.
        rings = snap.rings
        yield counter("ring_slots_published", "Slots the vLLM plugin wrote into the rings.", rings.published_slots)
        yield counter("ring_rows_published", "Token rows the vLLM plugin wrote into the rings.", rings.published_rows)
        yield counter("ring_rows_dropped", "Token rows the plugin dropped, never scored: no free ring slot "
                      "(or GPU staging buffer) when the step ended.", rings.dropped_rows)
        yield by_label("ring_slots_dropped", "Ring slots never scored, by reason: ring_full (dropped by the plugin), "
                       "overwritten (lapped before the sidecar read them, overwrite_oldest mode), corrupt (a slot "
                       "header or metadata that could not be read).", "reason",
                       {"ring_full": rings.dropped_slots, "overwritten": rings.lost_slots,
                        "corrupt": rings.corrupt_slots})
        yield by_label("slots_skipped", "Ring slots read but not scored, by reason: unusable_ring (the ring lacks a "
                       "layer the detectors need, or its width differs) or error (scoring the slot raised; logged).",
                       "reason", {"unusable_ring": st.slots_skipped.get("unusable_ring", 0),
                                  "error": st.slots_skipped.get("error", 0)})
        yield gauge("taps_disabled", "vLLM workers whose tap turned itself off because its ring could not be made "
                    "(`<ring>.off` markers; e.g. /dev/shm too small).", snap.taps_off)
        yield counter("ring_producer_errors", "Capture errors in the vLLM plugin (the tap disables itself).", rings.errors)
        yield gauge("ring_lag_slots", "Slots written but not yet read, summed over rings.", snap.ring_lag_slots)
        yield gauge("ring_capacity_slots", "Slots in the attached rings.", snap.ring_capacity_slots)
        yield gauge("rings_attached", "Rings (one per vLLM worker) the sidecar reads.", snap.rings_attached)
        yield gauge("loop_heartbeat_age_seconds", "Seconds since the scoring loop last iterated.", snap.heartbeat_age_s)

        yield by_label("config_reloads", "Config reloads, by outcome.", "outcome",
                       {"success": st.reloads_ok, "failure": st.reloads_failed})
        yield gauge("config_last_reload_successful", "1 if the last config reload succeeded (or none was tried).",
                    1.0 if st.last_reload_ok else 0.0)
        yield gauge("config_restart_required", "1 when the config file changes settings that apply only after a "
                    "sidecar restart (the log names them); the running ones stay meanwhile.",
                    1.0 if st.restart_required else 0.0)
        yield gauge("config_last_reload_success_timestamp_seconds", "When the running config was loaded.",
                    st.config_loaded_at)
        if m.expose_thresholds:
            thr = GaugeMetricFamily(f"{PREFIX}_detector_threshold", "Each detector's firing threshold.",
                                    labels=["model_name", "detector", "severity"])
            for det in snap.detectors.detectors:
                thr.add_metric([model, det.spec.name, det.spec.severity], det.spec.threshold)
            yield thr

        if m.kafka_stats is not None:
            c = m.kafka_stats()
            yield counter("kafka_events_sent", "Alert events acknowledged by Kafka (acks=all).", c.sent)
            yield counter("kafka_events_spooled", "Alert events that waited in the disk spool because the broker "
                          "was unreachable.", c.spooled)
            yield by_label("kafka_events_dropped", "Alert events lost, by reason: queue_full (memory queue), "
                           "spool_full (sinks.kafka.spool_max_bytes), disk_full (ENOSPC), spool_error (another I/O "
                           "error), each after a direct send failed too.", "reason",
                           {"queue_full": c.dropped_queue_full, "spool_full": c.dropped_spool_full,
                            "disk_full": c.dropped_disk_full, "spool_error": c.dropped_spool_error})
            yield counter("kafka_send_errors", "Failed send attempts (each retried from the spool).", c.send_errors)
            yield counter("kafka_sender_errors", "Unexpected errors in the Kafka sender thread (it carries on; "
                          "events wait in the spool).", c.sender_errors)
            yield counter("kafka_spool_quarantined", "Spool files that could not be read, moved to the spool's "
                          "quarantine/ folder (each an event, or a whole damaged spool database).", c.quarantined)
            yield gauge("kafka_spool_events", "Alert events on disk, not yet acknowledged by Kafka.", c.spool_events)
            yield gauge("kafka_spool_bytes", "Disk used by the spool (allocated blocks).", c.spool_bytes)
            yield gauge("kafka_queue_events", "Alert events in memory, not yet on disk: what a SIGKILL now would "
                        "lose.", c.queue_events)
            yield gauge("kafka_sender_up", "1 while the Kafka sender thread is alive and turning.",
                        1.0 if c.sender_up else 0.0)
        if m.control_stats is not None:
            c = m.control_stats()
            yield gauge("control_receivers", "vLLM API servers connected to the sidecar's control channel (the "
                        "middleware's sockets).", c.receivers)
            yield counter("control_messages_sent", "Control messages (verdicts, request ends, heartbeats) taken by an "
                          "API server.", c.sent)
            yield counter("control_messages_dropped", "Control messages an API server never got (its queue was full, "
                          "or it went away): an action not taken.", c.dropped)
        if m.drift is not None:
            yield from drift_families(m.drift, model)
        for h in m.bulk:
            yield h.collect()


def drift_families(drift: DriftTracker, model: str) -> Iterable:
    """Drift gauges: a series appears once its window can say something (see `monitor.detectors.drift`)."""
    score = GaugeMetricFamily(f"{PREFIX}_detector_score_psi", "Population-stability index of the detector's final "
                              "scores over its window against its calibration baseline (>0.25: a shift).",
                              labels=["model_name", "detector"])
    window = GaugeMetricFamily(f"{PREFIX}_drift_window_requests", "Requests in the detector's drift window.",
                               labels=["model_name", "detector"])
    for d in drift.detectors():
        window.add_metric([model, d.detector], d.requests)
        if d.psi is not None:
            score.add_metric([model, d.detector], d.psi)
    rate = GaugeMetricFamily(f"{PREFIX}_feature_firing_rate", "Share of prompt tokens in the window on which the "
                             "watched input fired (probe logit > 0, SAE feature active).", labels=["model_name", "feature"])
    base = GaugeMetricFamily(f"{PREFIX}_feature_firing_rate_baseline", "The same share on the calibration set.",
                             labels=["model_name", "feature"])
    fpsi = GaugeMetricFamily(f"{PREFIX}_feature_firing_psi", "Population-stability index of the input's firing rate "
                             "over the window against its calibration baseline.", labels=["model_name", "feature"])
    for i in drift.inputs():
        if i.rate is not None:
            rate.add_metric([model, i.input], i.rate)
        if i.baseline is not None:
            base.add_metric([model, i.input], i.baseline)
        if i.psi is not None:
            fpsi.add_metric([model, i.input], i.psi)
    yield from (score, window, rate, base, fpsi)


class SidecarMetrics:
    """Everything the sidecar exports, on a private registry.

    The loop's counters are read at scrape time through `snapshot`; what only exists as an event
    arrives through `on_tokens`, `on_detector`, `on_slot` and `on_delivered`, which whoever composes
    the sidecar subscribes to its bus (and to the Kafka sink).
    """

    def __init__(self, model_name: str, snapshot: Callable[[], LoopSnapshot],
                 kafka_stats: Callable[[], KafkaStats] | None = None, registry: CollectorRegistry | None = None,
                 expose_thresholds: bool = False, control_stats: Callable[[], SenderStats] | None = None,
                 drift: DriftTracker | None = None) -> None:
        self.snapshot = snapshot
        self.drift = drift
        self.control_stats = control_stats
        self.expose_thresholds = expose_thresholds
        self.kafka_stats = kafka_stats
        self.model_name = model_name
        self.version = package_version()
        disable_created_metrics()  # `_created` series double the exposition and no rule or panel reads them
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ["model_name", "detector", "severity"]
        # `mode`: a shadow detector's fires are counted like a live one's, and the paging rules skip them.
        # `tier`: a request counts once in each tier it reaches (`record` when it fires there, `page` when it
        # reaches `threshold`); a detector without a record tier counts in `page` only. The rules page on `page`.
        self.fires = Counter(f"{PREFIX}_detector_fires", "Detector fires (at most one per request, detector and tier).",
                             [*labels, "mode", "tier"], registry=r)
        self.actions = Counter(f"{PREFIX}_actions", "Actions ordered on requests by detectors that act (`action: "
                               "abort | annotate`), sent to vLLM's API servers.", [*labels, "action"], registry=r)
        self.verdicts = Counter(f"{PREFIX}_detector_evaluations",
                                "Requests a detector reached a verdict on, by outcome: fired (its page tier), recorded (only its "
                                "record tier), not_fired.",
                                [*labels, "mode", "outcome"], registry=r)
        self.outcomes = Counter(
            f"{PREFIX}_incident_outcomes", "Detectors' incidents by how the model's reply began: refused, answered "
            "(no refusal), no_reply, unknown (the reply is not read: evidence.read_reply). `severity` is the "
            "incident's (a detector's severity_if_answered when it answered); `escalated` says it was raised.",
            [*labels, "mode", "outcome", "escalated"], registry=r)
        self.detection_latency = Histogram(
            f"{PREFIX}_detection_latency_seconds",
            "From the end of the forward pass that pushed a detector over its threshold to the fire decision.",
            ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.scoring_latency = Histogram(f"{PREFIX}_scoring_duration_seconds",
                                         "Time to score one ring slot (all watched features and probes, one pass).",
                                         ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.step_lag = Histogram(f"{PREFIX}_scoring_lag_seconds",
                                  "From the end of a forward pass to its rows being scored.",
                                  ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.delivery_latency = None if kafka_stats is None else Histogram(
            f"{PREFIX}_kafka_delivery_latency_seconds", "From an alert event being queued to Kafka acknowledging it.",
            ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.features = BulkHistogram(f"{PREFIX}_feature_activation",
                                      "Watched SAE feature activations per scored token (feature = sae/index).",
                                      ("model_name", "feature"), FEATURE_BUCKETS)
        self.probes = BulkHistogram(f"{PREFIX}_probe_probability",
                                    "Watched probe outputs per scored token, as probabilities (feature = probe/output).",
                                    ("model_name", "feature"), PROBABILITY_BUCKETS)
        self.ratios = BulkHistogram(f"{PREFIX}_detector_score_ratio",
                                    "Each request's final detector score divided by the threshold (1 = firing line).",
                                    ("model_name", "detector"), RATIO_BUCKETS)
        self.bulk = [self.features, self.probes, self.ratios]
        self._prepared_for: DetectorSet | None = None
        self._detector_series: set[tuple] = set()  # (detector, severity, mode, tiers) exported now
        self._answered_series: set[tuple[str, str, str]] = set()  # (detector, severity_if_answered, mode)
        self.follow(snapshot().detectors)
        r.register(MonitorCollector(self))

    def follow(self, ds: DetectorSet) -> None:
        """Create every labelled series of this detector set at 0, so a first fire is an increase
        Prometheus can see. A no-op until the sidecar swaps in a new set (a config reload)."""
        if ds is self._prepared_for:
            return
        self._prepared_for = ds
        m = self.model_name
        for head in ds.heads.values():
            for name in head.columns:
                (self.probes if head.kind == "probe" else self.features).ensure((m, name))
        # A detector that left (or changed severity or mode) stops being exported: its old series would
        # otherwise stay forever, and a detector that went live would still look as if in shadow.
        now = {(d.spec.name, d.spec.severity, d.spec.mode, _tiers(d.spec)) for d in ds.detectors}
        for name, severity, mode, tiers in self._detector_series - now:
            for tier in tiers:
                self.fires.remove(m, name, severity, mode, tier)
            for outcome in ("fired", "not_fired", *(("recorded",) if "record" in tiers else ())):
                self.verdicts.remove(m, name, severity, mode, outcome)
        self._detector_series = now
        # The page on "the model answered" reads this series' increase: it exists at 0 from the start.
        answered = {(d.spec.name, d.spec.severity_if_answered, d.spec.mode) for d in ds.detectors
                    if d.spec.severity_if_answered is not None and d.spec.severity_if_answered != d.spec.severity}
        for name, severity, mode in self._answered_series - answered:
            self.outcomes.remove(m, name, severity, mode, "answered", "true")
        for name, severity, mode in answered:
            self.outcomes.labels(m, name, severity, mode, "answered", "true")
        self._answered_series = answered
        for det in ds.detectors:
            spec = det.spec
            for tier in _tiers(spec):
                self.fires.labels(m, spec.name, spec.severity, spec.mode, tier)
            if spec.action != "none" and spec.mode == "live":
                self.actions.labels(m, spec.name, spec.severity, spec.action)
            for outcome in ("fired", "not_fired", *(("recorded",) if spec.record_threshold is not None else ())):
                self.verdicts.labels(m, spec.name, spec.severity, spec.mode, outcome)
            self.ratios.ensure((m, spec.name))
        for h in (self.detection_latency, self.scoring_latency, self.step_lag, self.delivery_latency):
            if h is not None:
                h.labels(m)

    # ---- event callbacks (the loop's thread, and the Kafka sender's for on_delivered) ----
    def on_slot(self, s: SlotScored) -> None:
        self.scoring_latency.labels(self.model_name).observe(s.seconds)
        if s.step_time is not None:
            self.step_lag.labels(self.model_name).observe(max(0.0, time.time() - s.step_time))

    def on_tokens(self, t: TokenScores, detectors: DetectorSet) -> None:
        """`detectors`: the set that scored `t` (it names each head's kind and columns)."""
        self.follow(detectors)
        for name, values in t.scores.items():
            head = detectors.heads.get(name)
            if head is None:
                continue
            is_probe = head.kind == "probe"
            if is_probe:
                values = sigmoid(values)  # the probability histogram: one scale for every probe
            hist = self.probes if is_probe else self.features
            hist.observe_columns([(self.model_name, label) for label in head.columns], values)
        if self.drift is not None:
            self.drift.on_tokens(t, detectors)

    def on_incident(self, inc, outcome) -> None:
        """`outcome`: the request's ReplyOutcome (None: replies are not read here)."""
        what = outcome.outcome if outcome is not None else "unknown"
        for u in inc.fired:
            if not u.paged:  # a record-tier fire never pages, the model's answer to it included
                continue
            spec = u.detector
            severity = severity_for(spec, what)
            self.outcomes.labels(self.model_name, spec.name, severity, spec.mode, what,
                                 "true" if severity != spec.severity else "false").inc()

    def on_delivered(self, seconds: float) -> None:
        if self.delivery_latency is not None:
            self.delivery_latency.labels(self.model_name).observe(seconds)

    def on_detector(self, u: DetectorUpdate) -> None:
        spec = u.detector
        if u.fired_now or u.escalated_now:
            if u.fired_now and u.tier == "page" and spec.record_threshold is not None:
                self.fires.labels(self.model_name, spec.name, spec.severity, spec.mode, "record").inc()  # passed it too
            self.fires.labels(self.model_name, spec.name, spec.severity, spec.mode, u.tier or "page").inc()
        if (u.fired_now or u.escalated_now) and u.paged:
            if spec.action != "none" and spec.mode == "live" and u.alert_id is not None:
                self.actions.labels(self.model_name, spec.name, spec.severity, spec.action).inc()
        if u.fired_now:
            if u.step_time is not None:
                self.detection_latency.labels(self.model_name).observe(max(0.0, time.time() - u.step_time))
        if u.final:
            # `fired`: reached the page tier; `recorded`: only a detector's record tier (never paged).
            outcome = "fired" if u.paged else "recorded" if u.fired else "not_fired"
            self.verdicts.labels(self.model_name, spec.name, spec.severity, spec.mode, outcome).inc()
            if spec.threshold > 0:
                self.ratios.observe_many((self.model_name, spec.name), np.array([u.score / spec.threshold]))
            if self.drift is not None:
                self.drift.on_final(spec, u.score)


def _tiers(spec) -> tuple[str, ...]:
    return ("page",) if spec.record_threshold is None else ("record", "page")


WORKERS = 4  # concurrent requests: Prometheus, a probe or two, a person with curl
BACKLOG = 32  # connections waiting for a worker; beyond it new ones are closed at once
READ_TIMEOUT_S = 10.0  # a client that sends nothing gives its worker back after this


class _PooledWSGIServer(WSGIServer):
    """Connections served by a fixed pool of threads, with a bounded wait list: idle or slow clients
    cannot make the sidecar start a thread each (the standard ThreadingMixIn does)."""

    request_queue_size = BACKLOG

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="metrics-http")
        self.slots = threading.BoundedSemaphore(WORKERS + BACKLOG)
        self.refused = 0

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        self.pool.submit(self._serve, request, client_address)

    def _serve(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - a broken client must not take a worker down
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)


class _QuietHandler(WSGIRequestHandler):
    timeout = READ_TIMEOUT_S  # socket timeout: a silent client is dropped, its worker freed

    def log_message(self, format: str, *args) -> None:  # scrapes every few seconds: not worth a log line
        pass


class MetricsServer:
    """`/metrics` (Prometheus text), `/healthz` (the loop is alive), `/readyz` (config loaded, loop alive).

    Neither probe looks at Kafka or the rings: a broker outage or an idle vLLM is not a reason to
    restart the sidecar or take the pod out of service.
    """

    def __init__(self, metrics: SidecarMetrics, health: Callable[[], LoopHealth], host: str, port: int,
                 stale_after: float = 30.0) -> None:
        self.metrics = metrics
        self.stale_after = stale_after
        metrics_app = make_wsgi_app(metrics.registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "/")
            if path in ("/healthz", "/readyz"):
                h = health()
                ok = h.heartbeat_age_s < self.stale_after
                doc = {"status": "ok" if ok else "stalled", "loop_heartbeat_age_seconds": round(h.heartbeat_age_s, 3),
                       "detectors": h.detectors}
                if metrics.kafka_stats is not None:
                    # Detail, not a verdict: restarting the pod would not bring a broker back.
                    k = metrics.kafka_stats()
                    doc["kafka_sender"] = {"up": k.sender_up, "last_turn_age_seconds": round(k.sender_turn_age_s, 3),
                                           "spool_events": k.spool_events, "queue_events": k.queue_events}
                body = strict_json.dumps(doc, separators=(", ", ": ")).encode()  # an age may be inf: null
                start_response("200 OK" if ok else "503 Service Unavailable",
                               [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
                return [body]
            if path == "/metrics":
                return metrics_app(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: try /metrics, /healthz or /readyz\n"]

        self.httpd = make_server(host, port, app, _PooledWSGIServer, handler_class=_QuietHandler)
        self.port = self.httpd.server_port
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
