"""The ingester's `/metrics`: what says it is storing, dead-lettering, retrying or stalled.

A collector over `IngestStats` (read at scrape time, no second set of counters to keep in step) on
prometheus-client's own HTTP server, bound to `store.metrics_host` (loopback unless configured).
The Prometheus rules `MisalignmentMonitorIngesterStalled` and `MisalignmentMonitorIngesterDeadLettering`
read it (deploy/prometheus/rules.yml).
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

PREFIX = "misalignment_monitor_ingester_"


class IngesterCollector:
    def __init__(self, stats, store_name: str) -> None:
        self.stats, self.store_name = stats, store_name

    def collect(self):
        st = self.stats
        yield CounterMetricFamily(PREFIX + "events_stored", "Alert and incident events stored.", value=st.stored)
        yield CounterMetricFamily(PREFIX + "duplicates", "Events already stored (a redelivery); ignored.",
                                  value=st.duplicates)
        dead = CounterMetricFamily(PREFIX + "dead_letters", "Messages that cannot be stored, by reason; each is in the "
                                   "dead-letter table with its full reason and bytes, and the consumer moved on.",
                                   labels=["reason"])
        for reason, n in sorted(st.dead_by_reason.items()):
            dead.add_metric([reason], n)
        yield dead
        yield CounterMetricFamily(PREFIX + "db_retries", "Batches rolled back because the database was unreachable "
                                  "(read again after a back-off; nothing lost).", value=st.db_outages)
        yield CounterMetricFamily(PREFIX + "events_expired", "Events deleted by retention.", value=st.expired)
        yield GaugeMetricFamily(PREFIX + "last_success_timestamp_seconds", "When a batch was last committed "
                                "(0: not yet).", value=st.last_success)
        yield GaugeMetricFamily(PREFIX + "last_poll_timestamp_seconds", "When the consumer last polled Kafka: a "
                                "stuck ingester stops moving it.", value=st.last_poll)
        yield GaugeMetricFamily(PREFIX + "lag_messages", "Messages on its partitions not yet stored (end offsets "
                                "minus its positions), measured every few seconds.", value=st.lag)


def serve_metrics(stats, store_name: str, host: str, port: int):
    """Start the HTTP server (a daemon thread); returns it (`.shutdown()` stops it)."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    registry.register(IngesterCollector(stats, store_name))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
