"""The incident store against SQLite and a real PostgreSQL, fed through the real test broker by a
consumer group: each event stored once, bad messages dead-lettered, crashes and outages lose nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml

from monitor.cli import main
from monitor.config import load_config
from monitor.config.models import DetectorSpec
from monitor.detectors.trace import FeatureContext, Incident, TraceArrays
from monitor.detectors.updates import DetectorUpdate
from monitor.sinks.events import EventBuilder
from monitor.sinks.incidents import IncidentBuilder
from monitor.stack.kafka_broker import TansuBroker
from monitor.store.db import Store, StoreError
from monitor.store.ingest import Ingester

ALERTS, INCIDENTS = "misalignment-monitor.alerts", "misalignment-monitor.incidents"
SPEC = DetectorSpec.model_validate({"name": "pii-probe", "concept": "pii", "inputs": [{"probe": "pii"}],
                                    "aggregation": {"kind": "mean"}, "threshold": 0.5, "severity": "critical"})


def events_for(request_id: str) -> tuple[dict, dict]:
    """An alert event and the incident event of one fired request, as the sidecar makes them."""
    alert_id = str(uuid.uuid4())
    update = DetectorUpdate(f"chatcmpl-{request_id}-1a2b3c4d", request_id, f"chatcmpl-{request_id}", 0, SPEC, 0.9,
                            True, alert_id, 3, ((0.9, 3, {"pii/score": 2.2}),), True, False)
    pos = np.arange(6)
    trace = TraceArrays(pos, None, {"pii/score": np.linspace(-1, 2, 6)}, {"pii-probe": (pos[1:], np.linspace(.2, .9, 5))})
    final = DetectorUpdate(update.req, request_id, update.external_id, 0, SPEC, 0.9, True, alert_id, 3, update.top,
                           False, True)
    inc = Incident(update.req, request_id, update.external_id, 0, 4, (final,), trace,
                   (FeatureContext(3, "demo-l15", ((21, 3.5),)),), 0, 0, time.time())
    return EventBuilder(model="m", deployment="d").build(update), IncidentBuilder(model="m", deployment="d").build(inc)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/incidents.sqlite"
    return request.getfixturevalue("postgres").create_database(f"t_{uuid.uuid4().hex[:12]}")


def config(tmp_path: Path, broker: TansuBroker, url: str, **store) -> Path:
    (tmp_path / "db-url").write_text(url + "\n")  # as a mounted Secret would hold it
    path = tmp_path / "monitor.yaml"
    path.write_text(yaml.safe_dump({
        "sinks": {"kafka": {"enabled": True, "bootstrap_servers": [broker.bootstrap], "spool_dir": str(tmp_path / "spool")}},
        # The test broker completes a group join only with short timeouts (environment brief).
        "store": {"url_file": "db-url", "consumer_group": f"g-{uuid.uuid4().hex[:8]}", "max_poll_interval_ms": 3000,
                  "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, **store}}))
    return path


def produce(broker: TansuBroker, messages: list[tuple[str, str, bytes]]) -> None:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", max_request_size=8 * 1024 * 1024)
    for topic, key, value in messages:
        p.send(topic, key=key.encode(), value=value)
    p.flush()
    p.close()


def encoded(events: list[tuple[dict, dict]]) -> list[tuple[str, str, bytes]]:
    out = []
    for alert, incident in events:
        out.append((ALERTS, alert["subject"], json.dumps(alert).encode()))
        out.append((INCIDENTS, incident["subject"], json.dumps(incident).encode()))
    return out


def wait_for(store: Store, want: dict[str, int], timeout: float = 60.0) -> dict[str, int]:
    deadline = time.time() + timeout
    while True:
        got = store.counts()
        if all(got[k] >= v for k, v in want.items()) or time.time() > deadline:
            return got
        time.sleep(0.5)


def run_ingester(cfg_path: Path) -> tuple[threading.Thread, threading.Event, Ingester]:
    loaded = load_config(cfg_path)
    from monitor.store.db import store_url

    ing = Ingester(loaded.config, Store(store_url(loaded.config.store, loaded.path.parent)), loaded.path.parent)
    stop = threading.Event()
    t = threading.Thread(target=ing.run, args=(stop,), daemon=True)
    t.start()
    return t, stop, ing


def test_each_event_stored_once_bad_ones_dead_lettered(db_url, broker, tmp_path, capsys):
    cfg = config(tmp_path, broker, db_url, max_event_bytes=100_000)
    events = [events_for(f"req-{i}") for i in range(5)]
    alert, incident = events[0]
    wrong_version = dict(alert, type="io.misalignment-monitor.alert.v2")
    bad = [(ALERTS, "t", json.dumps(alert).encode()[:50]),  # truncated
           (ALERTS, "v", json.dumps(wrong_version).encode()),
           (INCIDENTS, "o", json.dumps(dict(incident, id="big", pad="x" * 150_000)).encode()),
           (INCIDENTS, "s", json.dumps({**incident, "data": {**incident["data"], "alert_ids": []}}).encode())]
    produce(broker, encoded(events) + encoded(events[:2]) + bad)  # two requests delivered twice
    t, stop, ing = run_ingester(cfg)
    store = ing.store
    got = wait_for(store, {"alerts": 5, "incidents": 5, "dead_letters": 4})
    stop.set()
    t.join(timeout=20)
    assert got == {"alerts": 5, "incidents": 5, "dead_letters": 4}
    assert ing.stats.duplicates == 4 and ing.stats.stored == 10 and ing.stats.dead_letters == 4
    from monitor.store.schema import DeadLetter

    with store.session() as s:
        reasons = sorted(d.reason for d in s.query(DeadLetter).all())
    assert any(r.startswith("not valid JSON (truncated?)") for r in reasons)
    assert any("unknown event type 'io.misalignment-monitor.alert.v2'" in r for r in reasons)
    assert any(r.startswith("oversized: ") and "store.max_event_bytes 100000" in r for r in reasons)
    assert any("does not match the io.misalignment-monitor.incident.v1 schema" in r and "alert_ids" in r for r in reasons)
    # The CLI reads it: newest first, and an alert id from a page leads to its incident.
    assert main(["incidents", "list", "--config", str(cfg), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == 5 and listed[0]["detectors"] == ["pii-probe"] and listed[0]["severity"] == "critical"
    assert main(["incidents", "show", alert["data"]["alert_id"], "--config", str(cfg), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["incident"]["id"] == incident["id"] and [a["id"] for a in shown["alerts"]] == [alert["id"]]
    assert main(["incidents", "show", "no-such-alert", "--config", str(cfg)]) == 1
    assert "no incident or alert with alert id no-such-alert" in capsys.readouterr().err
    store.close()


def test_killed_ingester_restarts_and_nothing_is_lost_or_doubled(db_url, broker, tmp_path):
    cfg = config(tmp_path, broker, db_url)
    events = [events_for(f"k-{i}") for i in range(150)]
    produce(broker, encoded(events[:75]))
    argv = [sys.executable, "-m", "monitor.cli", "incidents", "ingest", "--config", str(cfg)]
    log = (tmp_path / "ingest.log").open("ab")
    first = subprocess.Popen(argv, stdout=log, stderr=log)
    store = Store(db_url)
    wait_for(store, {"incidents": 10})
    produce(broker, encoded(events[75:]))
    first.kill()  # mid-stream: some batches stored and not committed to Kafka, some not read at all
    first.wait(timeout=30)
    second = subprocess.Popen(argv, stdout=log, stderr=log)
    got = wait_for(store, {"alerts": 150, "incidents": 150}, timeout=90)
    second.terminate()
    second.wait(timeout=30)
    assert got["alerts"] == 150 and got["incidents"] == 150, (tmp_path / "ingest.log").read_text()[-3000:]
    store.close()


def test_postgres_outage_pauses_and_resumes_without_loss(postgres, broker, tmp_path):
    url = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    cfg = config(tmp_path, broker, url)
    t, stop, ing = run_ingester(cfg)
    events = [events_for(f"o-{i}") for i in range(60)]
    produce(broker, encoded(events[:20]))
    assert wait_for(ing.store, {"incidents": 20})["incidents"] == 20
    postgres.stop()
    try:
        produce(broker, encoded(events[20:]))  # arrives while the database is down, for 20 s
        time.sleep(20)
        assert ing.stats.db_outages >= 1 and t.is_alive()
    finally:
        postgres.start()
    got = wait_for(ing.store, {"alerts": 60, "incidents": 60}, timeout=60)
    stop.set()
    t.join(timeout=20)
    assert got["alerts"] == 60 and got["incidents"] == 60
    ing.store.close()


def test_retention_deletes_old_events(db_url, broker, tmp_path):
    cfg = config(tmp_path, broker, db_url, retention_days=7)
    old = datetime.now(timezone.utc) - timedelta(days=8)
    stale = [tuple(dict(e, time=old.isoformat().replace("+00:00", "Z")) for e in events_for(f"old-{i}")) for i in range(3)]
    produce(broker, encoded(stale + [events_for("new")]))
    t, stop, ing = run_ingester(cfg)
    ing.expire_every = 0.5
    wait_for(ing.store, {"incidents": 1})
    deadline = time.time() + 30
    while ing.stats.expired < 6 and time.time() < deadline:
        time.sleep(0.5)
    stop.set()
    t.join(timeout=20)
    assert ing.stats.expired == 6  # 3 stale incidents and their 3 alerts
    assert [r.request_id for r in ing.store.incidents().rows] == ["new"]
    ing.store.close()


def test_bad_database_url_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "db-url").write_text("mysql+nodriver://u:hunter2@h/db")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"store": {"url_file": "db-url"}}))
    assert main(["incidents", "list", "--config", str(tmp_path / "m.yaml")]) == 2
    err = capsys.readouterr().err
    assert "not a usable database URL" in err and "hunter2" not in err
    with pytest.raises(StoreError, match="cannot reach the database"):
        Store("postgresql+psycopg://app@127.0.0.1:1/none")


def test_poison_events_are_dead_lettered_and_later_events_stored(db_url, broker, tmp_path):
    """Issue 29, finding 2: an escaped lone surrogate in an id killed the ingester's thread (and a restarted
    one died on the same offset); on PostgreSQL a 20 kB request id, a NUL, or a NaN/inf score was taken for
    "database unreachable" and retried forever. Each is now a dead letter with its reason, the same on
    SQLite and PostgreSQL, and the events after it are stored."""
    cfg = config(tmp_path, broker, db_url)
    good = [events_for(f"ok-{i}") for i in range(3)]
    alert, incident = events_for("poison")
    raw = json.dumps(alert)
    poison = [
        (ALERTS, "surrogate", raw.replace(alert["id"], alert["id"][:8] + "\\ud800").encode()),
        (ALERTS, "nul", raw.replace(alert["id"], alert["id"][:8] + "\\u0000").encode()),
        (ALERTS, "long", raw.replace(f'"request_id": "{alert["data"]["request_id"]}"',
                                     f'"request_id": "{"r" * 20_000}"').encode()),
        (ALERTS, "nan", raw.replace('"score": 0.9', '"score": NaN').encode()),
        (ALERTS, "inf", raw.replace('"score": 0.9', '"score": Infinity').encode()),
        (INCIDENTS, "nul-text", json.dumps(incident).replace('"model": "m"', '"model": "m\\u0000"').encode()),
    ]
    produce(broker, poison + encoded(good))
    t, stop, ing = run_ingester(cfg)
    got = wait_for(ing.store, {"alerts": 3, "incidents": 3, "dead_letters": 6})
    stop.set()
    t.join(timeout=20)
    assert not t.is_alive()
    assert got == {"alerts": 3, "incidents": 3, "dead_letters": 6}, got
    assert ing.stats.db_outages == 0
    from monitor.store.schema import DeadLetter

    with ing.store.session() as s:
        reasons = sorted(d.reason for d in s.query(DeadLetter).all())
    # pydantic already refuses the lone surrogate (not a valid string); the store's own check is the backstop
    assert sum("does not match" in r and "id" in r for r in reasons) == 1 and sum("NUL" in r for r in reasons) == 2
    assert any("alerts.request_id: 20000 characters, the column holds 512" in r for r in reasons)
    assert sum("is no number in RFC 8259" in r for r in reasons) == 2
    assert ing.stats.dead_by_reason == {"schema": 1, "unstorable_text": 2, "too_long": 1, "not_json": 2}
    # What Prometheus scrapes from `monitor incidents ingest` (the rules' inputs).
    import urllib.request

    from monitor.store.metrics import serve_metrics

    server = serve_metrics(ing.stats, ing.store.name, "127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    assert 'misalignment_monitor_ingester_dead_letters_total{reason="too_long"} 1.0' in text
    assert "misalignment_monitor_ingester_events_stored_total 6.0" in text
    assert "misalignment_monitor_ingester_db_retries_total 0.0" in text
    last = float(re.search(r"^misalignment_monitor_ingester_last_success_timestamp_seconds (\S+)$", text, re.M).group(1))
    assert time.time() - 120 < last <= time.time()
    ing.store.close()
