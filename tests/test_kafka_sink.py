"""Alert events through the real test broker (tansu): schema, dedupe, outage and spool, in order."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict

import jsonschema
import numpy as np
import pytest

from monitor.config.models import DetectorSpec, Kafka
from monitor.detectors.aggregate import Ragged
from monitor.detectors.runtime import CompiledDetector, DetectorBank, InputRef
from monitor.sinks.events import EventBuilder, FeatureExplanations, alert_schema
from monitor.sinks.incidents import incident_schema
from monitor.detectors.updates import DetectorUpdate
from monitor.sinks.kafka import KafkaSink
from monitor.stack.kafka_broker import TansuBroker
from sidecar_helpers import open_ring, publish_request, start_service, tiny_monitor

TOPIC = "misalignment-monitor.alerts"
INCIDENTS = "misalignment-monitor.incidents"


def fired_state(seq: int) -> DetectorBank:
    """A detector's state on a request (slot 0), after it fired."""
    spec = DetectorSpec.model_validate({
        "name": "pii-feature", "concept": "pii", "inputs": [{"sae": "demo-l15", "feature": 21}],
        "aggregation": {"kind": "max"}, "threshold": 1.0, "severity": "critical", "labels": {"seq": str(seq)}})
    bank = DetectorBank(CompiledDetector(spec, [InputRef("sae:demo-l15", 0, 1.0, False, "demo-l15/21")]), capacity=1)
    bank.update(Ragged.of(np.array([0]), np.array([0]), np.array([2])), np.array([3, 4]),
                {"sae:demo-l15": np.array([[0.5], [2.0 + seq]])})
    return bank


def fired_update(request_id: str, seq: int, final: bool = False, state=None) -> DetectorUpdate:
    """A detector that fired on a request (or, with `state` and `final`, that request's verdict)."""
    state = state or fired_state(seq)
    return state.snapshot(0, f"chatcmpl-{request_id}-00000000", request_id, f"chatcmpl-{request_id}", 0,
                          fired_now=not final, final=final)


def consume_all(broker: TansuBroker, expect: int, timeout: float = 30.0, topic: str = TOPIC) -> list[dict]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False, consumer_timeout_ms=1000)
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    out: list[dict] = []
    deadline = time.time() + timeout
    while len(out) < expect and time.time() < deadline:
        for msg in c.poll(timeout_ms=500).get(tp, []):
            event = json.loads(msg.value)
            assert msg.key.decode() == event["subject"]  # key = request id: one request's events stay in order
            out.append(event)
    c.close()
    return out


def sink_for(broker, tmp_path, **kw) -> KafkaSink:
    cfg = Kafka(enabled=True, bootstrap_servers=[broker.bootstrap], topic=TOPIC, spool_dir=str(tmp_path / "spool"), **kw)
    return KafkaSink(cfg, retry_every=0.5)


def test_events_arrive_valid_and_deduplicable(broker, tmp_path):
    builder = EventBuilder(model="smollm2-135m-instruct", deployment="test",
                           explanations=FeatureExplanations({"demo-l15/21": "peaks on: '4'"}))
    sink = sink_for(broker, tmp_path)
    made = []
    for i in range(10):
        state = fired_state(i)
        for update in (fired_update(f"req-{i}", i, state=state), fired_update(f"req-{i}", i, final=True, state=state)):
            ev = builder.build(update)
            made.append(ev)
            assert sink.submit(ev)
    sink.close()
    got = consume_all(broker, len(made))
    schema = alert_schema()
    for ev in got:
        jsonschema.validate(ev, schema)
    assert {e["id"] for e in got} == {e["id"] for e in made} and len(got) == len(made)
    fire, final = got[0]["data"], got[1]["data"]
    assert (fire["revision"], fire["final"], final["revision"], final["final"]) == (0, False, 1, True)
    assert fire["alert_id"] == final["alert_id"] and fire["request_id"] == "req-0"
    assert fire["tokens"][0]["inputs"][0] == {"input": "demo-l15/21", "value": 2.0, "explanation": "peaks on: '4'"}
    assert not any("text" in t for e in got for t in e["data"]["tokens"])  # no text by default
    assert sink.counters.sent == 20 and sink.counters.spooled == 0


def test_broker_outage_spools_and_delivers_in_order(broker, tmp_path):
    """Broker down for 30 s mid-traffic: every event arrives exactly once after dedupe, in per-request order."""
    builder = EventBuilder(model="m", deployment="test")
    sink = sink_for(broker, tmp_path)
    seq = 0
    made: list[dict] = []

    def emit(n):
        nonlocal seq
        for _ in range(n):
            ev = builder.build(fired_update(f"req-{seq % 3}", seq))
            made.append(ev)
            sink.submit(ev)
            seq += 1

    emit(9)
    before = consume_all(broker, 9)
    assert len(before) == 9
    broker.stop()
    t0 = time.time()
    while time.time() - t0 < 30:  # 30 s of traffic with the broker down
        emit(1)
        time.sleep(1.0)
    assert sink.counters.spooled > 0 and sink.counters.dropped_spool_full == 0
    broker.start()  # memory storage: a fresh, empty broker
    broker.create_topic(TOPIC)
    emit(6)
    deadline = time.time() + 60
    while (len(sink.spool) or not sink.queue.empty()) and time.time() < deadline:
        time.sleep(0.2)
    sink.close()
    after = consume_all(broker, len(made) - 9, timeout=30)
    got = {e["id"]: e for e in before + after}
    assert set(got) == {e["id"] for e in made}, f"missing {len({e['id'] for e in made} - set(got))} events"
    by_request = defaultdict(list)
    for e in before + after:
        by_request[e["subject"]].append(int(e["data"]["labels"]["seq"]))
    for rid, seqs in by_request.items():
        assert seqs == sorted(seqs), f"{rid} out of order: {seqs}"


def test_full_spool_drops_and_counts(tmp_path):
    builder = EventBuilder(model="m", deployment="test")
    # Nothing listens on this port: every event waits on disk, in a spool capped at 160 KiB of real disk use
    # (an empty SQLite spool in WAL mode takes ~60 KiB; each event ~1 KiB plus page overhead).
    cfg = Kafka(enabled=True, bootstrap_servers=["127.0.0.1:1"], topic=TOPIC, spool_dir=str(tmp_path / "spool"),
                spool_max_bytes=160 * 1024)
    sink = KafkaSink(cfg, retry_every=60)
    for i in range(200):
        sink.submit(builder.build(fired_update("req-0", i)))
    deadline = time.time() + 60
    while len(sink.spool) + sink.counters.dropped_spool_full < 200 and time.time() < deadline:
        time.sleep(0.1)
    stats = sink.stats()
    sink.close()
    assert stats.spool_events > 0 and stats.dropped_spool_full > 0
    assert stats.spool_events + stats.dropped_spool_full == 200  # every event on disk or counted as lost
    assert stats.spool_bytes <= cfg.spool_max_bytes  # the cap is on real disk use (log and database)
    reopened = KafkaSink(cfg, retry_every=60)
    assert len(reopened.spool) == stats.spool_events  # kept on disk for the next start
    reopened.close()


def test_sidecar_service_publishes_alerts(broker, tmp_path):
    """Rows on a real ring -> `monitor sidecar`'s service -> alert events a consumer reads."""
    cfg = tiny_monitor(tmp_path, {"kafka": {"enabled": True, "bootstrap_servers": [broker.bootstrap], "topic": TOPIC,
                                            "spool_dir": str(tmp_path / "spool")}, "prometheus": {"enabled": False}})
    ring = open_ring(tmp_path)
    service, stop = start_service(cfg, ring)
    publish_request(ring, [0.0, 9.0, 1.0])
    got = consume_all(broker, 2, timeout=30)
    incidents = consume_all(broker, 1, timeout=30, topic=INCIDENTS)
    stop.set()
    service.join(timeout=20)
    ring.close()
    assert [(e["data"]["revision"], e["data"]["final"]) for e in got] == [(0, False), (1, True)]
    assert {e["subject"] for e in got} == {"abc"} and got[0]["data"]["severity"] == "critical"
    assert got[0]["source"] == "/misalignment-monitor/unit/local" and got[0]["data"]["score"] == 9.0
    assert got[0]["data"]["forward_pass_time"] is not None  # detection latency is measurable from the event
    for e in got:
        jsonschema.validate(e, alert_schema())
    (inc,) = incidents  # one incident for the fired request, on its own topic, keyed by the request id
    jsonschema.validate(inc, incident_schema())
    assert inc["subject"] == "abc" and inc["data"]["alert_ids"] == [got[0]["data"]["alert_id"]]
    assert np.allclose(inc["data"]["trace"]["inputs"]["s/3"], [0.0, 9.0, 1.0])


def test_alert_schema_is_generated_from_the_event_model(tmp_path):
    """monitor/schemas/alert.v1.json is what the AlertEvent model says; a stale copy fails here."""
    for module in ("monitor.sinks.events", "monitor.sinks.incidents"):
        res = subprocess.run([sys.executable, "-m", module, "--check"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    schema = alert_schema()
    assert schema["$id"] == "misalignment-monitor/alert.v1.json" and schema["additionalProperties"] is False
    event = EventBuilder(model="m", deployment="test", namespace="llm-prod").build(fired_update("req-s", 0))
    jsonschema.validate(event, schema)
    assert event["data"]["namespace"] == "llm-prod"  # deployment.namespace reaches the event
    bad = {**fired_event(), "extra": 1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def fired_event() -> dict:
    return EventBuilder(model="m", deployment="test").build(fired_update("req-s", 0))
