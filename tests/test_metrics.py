"""The sidecar's /metrics: what an operator scrapes after traffic, and that promtool accepts the exposition."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from binaries import binary
from monitor.stack.vllm_server import free_port
from sidecar_helpers import open_ring, publish_request, start_service, tiny_monitor


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    want = {"model_name": "tiny", **labels}
    hits = [v for (n, ls), v in samples(text).items() if n == name and all(dict(ls).get(k) == x for k, x in want.items())]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} series"
    return hits[0]


@pytest.fixture()
def service(tmp_path):
    port = free_port()
    cfg = tiny_monitor(tmp_path, {"prometheus": {"port": port, "expose_thresholds": True}})
    ring = open_ring(tmp_path)
    thread, stop = start_service(cfg, ring)
    yield port, ring, tmp_path
    stop.set()
    thread.join(timeout=20)
    ring.close()


def wait_for(port: int, name: str, target: float, **labels: str) -> str:
    deadline = time.time() + 20
    while True:
        text = scrape(port)
        try:
            if value(text, name, **labels) >= target:
                return text
        except AssertionError:
            pass
        assert time.time() < deadline, f"{name} never reached {target}:\n{text}"
        time.sleep(0.1)


def test_metrics_after_traffic(service):
    port, ring, _ = service
    before = scrape(port)
    # Every detector's fire counter exists at 0 before any fire, so Prometheus sees the first one as an increase.
    assert value(before, "misalignment_monitor_detector_fires_total", detector="feat", severity="critical") == 0
    publish_request(ring, [0.0, 9.0, 1.0], req="hot")    # fires (max 9 >= 5)
    publish_request(ring, [0.0, 1.0, 2.0, 0.5], req="cold")  # does not
    text = wait_for(port, "misalignment_monitor_detector_evaluations_total", 1, detector="feat", outcome="not_fired")
    assert value(text, "misalignment_monitor_tokens_scored_total") == 7
    assert value(text, "misalignment_monitor_requests_scored_total") == 2
    assert value(text, "misalignment_monitor_requests_completed_total", reason="finished") == 2
    assert value(text, "misalignment_monitor_detector_fires_total", detector="feat", severity="critical") == 1
    assert value(text, "misalignment_monitor_detector_evaluations_total", detector="feat", outcome="fired") == 1
    assert value(text, "misalignment_monitor_ring_rows_published_total") == 7
    assert value(text, "misalignment_monitor_ring_slots_dropped_total", reason="ring_full") == 0
    assert value(text, "misalignment_monitor_detector_threshold", detector="feat") == 5.0
    # The feature histogram saw all 7 rows; 1 of them (x0 = 0) is at 0, and 9.0 is the only one above 8.
    assert value(text, "misalignment_monitor_feature_activation_count", feature="s/3") == 7
    assert value(text, "misalignment_monitor_feature_activation_bucket", feature="s/3", le="0.0") == 2
    assert value(text, "misalignment_monitor_feature_activation_bucket", feature="s/3", le="8.0") == 6
    assert value(text, "misalignment_monitor_feature_activation_sum", feature="s/3") == pytest.approx(13.5)
    # Final scores over the threshold: 9/5 and 2/5.
    assert value(text, "misalignment_monitor_detector_score_ratio_bucket", detector="feat", le="1.0") == 1
    assert value(text, "misalignment_monitor_detector_score_ratio_count", detector="feat") == 2
    assert value(text, "misalignment_monitor_detection_latency_seconds_count") == 1
    assert value(text, "misalignment_monitor_build_info") == 1
    assert "request" not in json.dumps([dict(k[1]) for k in samples(text)])  # never a request id as a label


def test_promtool_accepts_the_exposition(service):
    port, ring, _ = service
    publish_request(ring, [0.0, 9.0, 1.0])
    text = wait_for(port, "misalignment_monitor_detector_fires_total", 1, detector="feat", severity="critical")
    res = subprocess.run([binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_health_and_reload_failure(service):
    port, _, tmp_path = service
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).read())
    assert health["status"] == "ok" and health["detectors"] == 1
    assert value(scrape(port), "misalignment_monitor_config_last_reload_successful") == 1
    (tmp_path / "det/f.yaml").write_text("name: feat\nthreshold: [not a number\n")  # a bad edit
    text = wait_for(port, "misalignment_monitor_config_reloads_total", 1, outcome="failure")
    assert value(text, "misalignment_monitor_config_last_reload_successful") == 0
    # Still serving, still ready: a bad edit keeps the running config.
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200


def test_every_exported_metric_is_documented(service):
    """docs/metrics.md lists exactly what the sidecar exports (with Kafka on, every family exists)."""
    import re
    from pathlib import Path

    port, ring, _ = service
    publish_request(ring, [0.0, 9.0, 1.0])
    text = wait_for(port, "misalignment_monitor_detector_fires_total", 1, detector="feat", severity="critical")
    exported = {f.name for f in text_string_to_metric_families(text)}
    doc = (Path(__file__).resolve().parent.parent / "docs/metrics.md").read_text()
    documented = {re.sub(r"_total$", "", m) for m in re.findall(r"^\| `(misalignment_monitor_\w+)`", doc, flags=re.M)}
    kafka_only = {m for m in documented if m.startswith("misalignment_monitor_kafka_")}
    ingester = {m for m in documented if m.startswith("misalignment_monitor_ingester_")}  # its own endpoint
    assert exported == documented - kafka_only - ingester, (exported ^ (documented - kafka_only - ingester))
    from monitor.store.ingest import IngestStats
    from monitor.store.metrics import IngesterCollector

    assert {f.name for f in IngesterCollector(IngestStats(), "s").collect()} == ingester
