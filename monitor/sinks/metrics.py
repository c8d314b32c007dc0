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

import json
import logging
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from monitor.detectors.runtime import probe_head, sae_head
from monitor.sidecar.loop import RETIRED_COUNTERS

if TYPE_CHECKING:
    from monitor.sidecar.loop import DetectorUpdate, Sidecar, SlotScored, TokenScores
    from monitor.sinks.kafka import KafkaSink

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
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        idx = np.searchsorted(self.bounds, values, side="left")  # value <= bound[i] lands in bucket i
        counts = np.bincount(idx, minlength=len(self.bounds) + 1)
        with self._lock:
            series = self._series.setdefault(labels, [np.zeros(len(self.bounds) + 1, dtype=np.int64), 0.0])
            series[0] += counts
            series[1] += float(values.sum())

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
        m.follow_reload()  # a reload's new detectors are exported at 0 before their first token
        sc, model = m.sidecar, m.model_name
        st = sc.stats

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

        info = GaugeMetricFamily(f"{PREFIX}_build_info", "Version of the monitor; always 1.",
                                 labels=["version", "model_name"])
        info.add_metric([m.version, model], 1)
        yield info
        yield counter("tokens_scored", "Token rows scored by the sidecar (prompt and generated).", st.tokens_scored)
        yield counter("requests_scored", "Requests whose rows reached the sidecar.", st.requests_seen)
        yield by_label("requests_completed", "Requests whose state was released, by reason.", "reason",
                       {"finished": st.requests_finished, "timed_out": st.requests_expired})
        yield gauge("requests_in_flight", "Requests with detector state held by the sidecar.", len(sc.requests))
        yield counter("positions_not_covered", "Token positions vLLM never computed (prefix-cache hits), so never scored.",
                      st.uncovered_positions)
        yield counter("duplicate_rows", "Rows for positions already scored (preempted requests recomputed); ignored.",
                      st.duplicate_rows)
        yield counter("slots_read", "Ring slots read by the sidecar.", st.slots)

        # The producers' counters live in the rings' shared-memory headers.
        rings, retired = sc.producer_counters()
        totals = {k: retired.get(k, 0) + sum(c[k] for c in rings.values()) for k in RETIRED_COUNTERS}
        yield counter("ring_slots_published", "Slots the vLLM plugin wrote into the rings.", totals["published_slots"])
        yield counter("ring_rows_published", "Token rows the vLLM plugin wrote into the rings.", totals["published_rows"])
        yield counter("ring_rows_dropped", "Token rows the plugin dropped, never scored: no free ring slot "
                      "(or GPU staging buffer) when the step ended.", totals["dropped_rows"])
        yield by_label("ring_slots_dropped", "Ring slots never scored, by reason: ring_full (dropped by the plugin) or "
                       "overwritten (lapped before the sidecar read them, overwrite_oldest mode).", "reason",
                       {"ring_full": totals["dropped_slots"], "overwritten": totals["lost_slots"]})
        yield counter("ring_producer_errors", "Capture errors in the vLLM plugin (the tap disables itself).", totals["errors"])
        yield gauge("ring_lag_slots", "Slots written but not yet read, summed over rings.",
                    sum(c.get("lag_slots", 0) for c in rings.values()))
        cap = sum(r.spec.slots for r in list(sc.readers.values()))  # specs outlive a close
        yield gauge("ring_capacity_slots", "Slots in the attached rings.", cap)
        yield gauge("rings_attached", "Rings (one per vLLM worker) the sidecar reads.", len(rings))
        yield gauge("loop_heartbeat_age_seconds", "Seconds since the scoring loop last iterated.",
                    max(0.0, time.monotonic() - sc.heartbeat))

        yield by_label("config_reloads", "Config reloads, by outcome.", "outcome",
                       {"success": st.reloads_ok, "failure": st.reloads_failed})
        yield gauge("config_last_reload_successful", "1 if the last config reload succeeded (or none was tried).",
                    1.0 if st.last_reload_ok else 0.0)
        yield gauge("config_last_reload_success_timestamp_seconds", "When the running config was loaded.",
                    st.config_loaded_at)
        thr = GaugeMetricFamily(f"{PREFIX}_detector_threshold", "Each detector's firing threshold.",
                                labels=["model_name", "detector", "severity"])
        for det in sc.detectors.detectors:
            thr.add_metric([model, det.spec.name, det.spec.severity], det.spec.threshold)
        yield thr

        k = m.kafka
        if k is not None:
            c = k.counters
            yield counter("kafka_events_sent", "Alert events acknowledged by Kafka (acks=all).", c.sent)
            yield counter("kafka_events_spooled", "Alert events written to the disk spool (broker unreachable).", c.spooled)
            yield by_label("kafka_events_dropped", "Alert events lost, by reason.", "reason",
                           {"queue_full": c.dropped_queue_full, "spool_full": c.dropped_spool_full})
            yield counter("kafka_send_errors", "Failed send attempts (each retried from the spool).", c.send_errors)
            yield gauge("kafka_spool_events", "Alert events waiting in the disk spool.", k.spool_len)
            yield gauge("kafka_spool_bytes", "Bytes in the disk spool.", k.spool.bytes)
            yield gauge("kafka_queue_events", "Alert events waiting in memory for the sender.", k.queue.qsize())
        for h in m.bulk:
            yield h.collect()


class SidecarMetrics:
    """Subscribes to the sidecar's bus and exposes everything on a private registry."""

    def __init__(self, sidecar: "Sidecar", kafka: "KafkaSink | None" = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.sidecar = sidecar
        self.kafka = kafka
        self.model_name = sidecar.loaded.config.model.name
        self.version = package_version()
        disable_created_metrics()  # `_created` series double the exposition and no rule or panel reads them
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ["model_name", "detector", "severity"]
        self.fires = Counter(f"{PREFIX}_detector_fires", "Detector fires (at most one per request and detector).",
                             labels, registry=r)
        self.verdicts = Counter(f"{PREFIX}_detector_evaluations",
                                "Requests a detector reached a verdict on, by outcome (fired or not).",
                                [*labels, "outcome"], registry=r)
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
        self.delivery_latency = None if kafka is None else Histogram(
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
        self._heads: dict[str, tuple[bool, list[str]]] = {}
        self._prepared_for = None
        self.prepare()
        r.register(MonitorCollector(self))
        sidecar.bus.on_tokens(self._on_tokens)
        sidecar.bus.on_detector(self._on_detector)
        sidecar.bus.on_slot(self._on_slot)
        if kafka is not None:
            kafka.on_delivered = lambda seconds: self.delivery_latency.labels(self.model_name).observe(seconds)

    def prepare(self) -> None:
        """Create every labelled series at 0, so a first fire is an increase Prometheus can see.

        Runs again whenever the sidecar swaps in a new detector set (a config reload)."""
        ds = self._prepared_for = self.sidecar.detectors
        m = self.model_name
        heads: dict[str, tuple[bool, list[str]]] = {}
        for sae, cols in ds.feature_columns.items():
            heads[sae_head(sae)] = (False, [f"{sae}/{c}" for c in cols])
        for probe, outputs in ds.probe_outputs.items():
            heads[probe_head(probe)] = (True, [f"{probe}/{o}" for o in outputs])
        self._heads = heads
        for is_probe, names in heads.values():
            for name in names:
                (self.probes if is_probe else self.features).ensure((m, name))
        for det in ds.detectors:
            spec = det.spec
            self.fires.labels(m, spec.name, spec.severity)
            for outcome in ("fired", "not_fired"):
                self.verdicts.labels(m, spec.name, spec.severity, outcome)
            self.ratios.ensure((m, spec.name))
        for h in (self.detection_latency, self.scoring_latency, self.step_lag, self.delivery_latency):
            if h is not None:
                h.labels(m)

    def follow_reload(self) -> None:
        if self.sidecar.detectors is not self._prepared_for:
            self.prepare()

    # ---- bus callbacks (the loop's thread) ----
    def _on_slot(self, s: "SlotScored") -> None:
        self.scoring_latency.labels(self.model_name).observe(s.seconds)
        if s.step_time is not None:
            self.step_lag.labels(self.model_name).observe(max(0.0, time.time() - s.step_time))

    def _on_tokens(self, t: "TokenScores") -> None:
        self.follow_reload()
        for head, values in t.scores.items():
            is_probe, names = self._heads.get(head, (False, []))
            if is_probe:
                values = 1.0 / (1.0 + np.exp(-values.astype(np.float64)))
            hist = self.probes if is_probe else self.features
            for j, name in enumerate(names):
                hist.observe_many((self.model_name, name), values[:, j])

    def _on_detector(self, u: "DetectorUpdate") -> None:
        self.follow_reload()
        spec = u.detector
        if u.fired_now:
            self.fires.labels(self.model_name, spec.name, spec.severity).inc()
            if u.step_time is not None:
                self.detection_latency.labels(self.model_name).observe(max(0.0, time.time() - u.step_time))
        if u.final:
            outcome = "fired" if u.state.fired else "not_fired"
            self.verdicts.labels(self.model_name, spec.name, spec.severity, outcome).inc()
            if spec.threshold > 0:
                self.ratios.observe_many((self.model_name, spec.name), np.array([u.state.score / spec.threshold]))


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # scrapes every few seconds: not worth a log line
        pass


class MetricsServer:
    """`/metrics` (Prometheus text), `/healthz` (the loop is alive), `/readyz` (config loaded, loop alive).

    Neither probe looks at Kafka or the rings: a broker outage or an idle vLLM is not a reason to
    restart the sidecar or take the pod out of service.
    """

    def __init__(self, metrics: SidecarMetrics, host: str, port: int, stale_after: float = 30.0) -> None:
        self.metrics = metrics
        self.stale_after = stale_after
        metrics_app = make_wsgi_app(metrics.registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "/")
            if path in ("/healthz", "/readyz"):
                age = time.monotonic() - metrics.sidecar.heartbeat
                ok = age < self.stale_after
                body = json.dumps({"status": "ok" if ok else "stalled", "loop_heartbeat_age_seconds": round(age, 3),
                                   "detectors": len(metrics.sidecar.detectors.detectors)}).encode()
                start_response("200 OK" if ok else "503 Service Unavailable",
                               [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
                return [body]
            if path == "/metrics":
                return metrics_app(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: try /metrics, /healthz or /readyz\n"]

        self.httpd = make_server(host, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler)
        self.port = self.httpd.server_port
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
