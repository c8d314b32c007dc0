"""What the demo checks: every expected signal arrived (Kafka events, Prometheus alerts, pages), and
benign requests paged nobody."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

from monitor.config.models import DetectorSpec
from monitor.demo.traffic import DemoRequest
from monitor.sinks.events import tier_of
from monitor.stack.alerting import Prometheus, WebhookReceiver

CONSUMER_GROUP = "monitor-demo"


class EventConsumer:
    """A Kafka consumer *group* reading alert events, as a SIEM or case tool would."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.events: list[dict] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, args=(bootstrap, topic), name="demo-consumer", daemon=True)
        self.thread.start()

    def _run(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaConsumer

        try:
            # Short group timeouts: the test broker only completes a group join with them (environment brief).
            consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=CONSUMER_GROUP,
                                     auto_offset_reset="earliest", enable_auto_commit=True,
                                     max_poll_interval_ms=3000, session_timeout_ms=6000, heartbeat_interval_ms=1000,
                                     value_deserializer=lambda b: json.loads(b))
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"
            return
        try:
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=500).values():
                    with self._lock:
                        self.events.extend(r.value for r in records)
        finally:
            consumer.close()

    def received(self) -> list[dict]:
        with self._lock:
            return list(self.events)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)


@dataclass
class Expectations:
    """What must arrive for `--once` to pass, and what did."""

    kafka: dict[tuple[str, str], bool] = field(default_factory=dict)  # (request id, detector) -> consumed
    alerts: dict[str, bool] = field(default_factory=dict)  # detector -> MisalignmentDetectorFired firing
    pages: dict[tuple[str, str], bool] = field(default_factory=dict)  # (receiver, detector) -> received
    benign_quiet: dict[str, bool] = field(default_factory=dict)  # request id -> no page-tier event about it
    # flagged request id -> what is wrong with its incident event (None: exactly one, its trace whole)
    incidents: dict[str, str | None] = field(default_factory=dict)
    console: dict[str, bool] = field(default_factory=dict)  # flagged request id -> its page opens in the console
    # (receiver, detector) -> MisalignmentModelAnswered received: expected once an incident says the model
    # answered what a detector with `severity_if_answered` flagged (the reply decides, not the script)
    answered: dict[tuple[str, str], bool] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def not_arrived(self) -> list[str]:
        out = [f"kafka event: {d} on {r}" for (r, d), ok in self.kafka.items() if not ok]
        out += [f"incident of {r}: {problem}" for r, problem in self.incidents.items() if problem]
        out += [f"console page of {r}" for r, ok in self.console.items() if not ok]
        out += [f"prometheus alert: MisalignmentDetectorFired{{detector={d}}}" for d, ok in self.alerts.items() if not ok]
        out += [f"page to {rcv}: the model answered what {d} flagged" for (rcv, d), ok in self.answered.items() if not ok]
        return out + [f"page to {rcv}: {d}" for (rcv, d), ok in self.pages.items() if not ok]

    def missing(self) -> list[str]:
        out = self.not_arrived()
        out += [f"benign request {r} reached a page tier (alert or incident event)" for r, ok in self.benign_quiet.items()
                if not ok]
        return out + [f"skipped: {s}" for s in self.skipped]


class ConsoleClient:
    """The console's JSON API and pages, as the demo token sees them."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def get(self, path: str) -> tuple[int, bytes]:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def pages_open(self) -> dict[str, int]:
        """request id -> status of its incident page (for every incident the console lists)."""
        status, body = self.get("/api/incidents?limit=500")
        if status != 200:
            return {}
        return {i["request_id"]: self.get(f"/incidents/{i['alert_ids'][0]}")[0] for i in json.loads(body)["items"]}


def link_statuses(urls: dict[str, str], console: ConsoleClient | None) -> dict[str, int]:
    """Every web link the demo prints -> the status a browser gets (console pages as the checks' viewer,
    who logged in). Not http (Kafka, the SQLite store): not a link."""
    import urllib.error
    import urllib.request

    out = {}
    for name, url in urls.items():
        if not url.startswith("http"):
            continue
        if console is not None and url.startswith(console.url):
            out[name] = console.get(url[len(console.url):])[0]
            continue
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                out[name] = r.status
        except urllib.error.HTTPError as e:
            out[name] = e.code
        except OSError:
            out[name] = 0
    return out


class StoredIncidents:
    """The incident events the demo's ingester stored (SQLite in the run folder)."""

    def __init__(self, url: str) -> None:
        from monitor.store.db import Store

        self.store = Store(url)

    def received(self) -> list[dict]:
        return self.store.incident_events(limit=10_000)

    def close(self) -> None:
        self.store.close()


def incident_problem(events: list[dict]) -> str | None:
    """None when exactly one incident is stored and its trace covers every token of the request."""
    if not events:
        return "not stored"
    if len(events) > 1:
        return f"{len(events)} incidents stored for one request"
    d = events[0]["data"]
    positions = d["trace"]["positions"]
    if positions != list(range(len(positions))) or len(positions) <= d["prompt_tokens"]:
        return f"trace covers {len(positions)} positions, not the prompt ({d['prompt_tokens']}) and its answer"
    return None


def expectations(requests: list[DemoRequest], detectors: dict[str, DetectorSpec], kafka: bool,
                 prometheus: bool) -> Expectations:
    exp = Expectations()
    for r in requests:
        if not r.expect:
            exp.benign_quiet[r.request_id] = True
        for d in r.expect:
            if d not in detectors:
                raise SystemExit(f"demo request {r.name} expects unknown detector {d}")
            if kafka:
                exp.kafka[(r.request_id, d)] = False
                exp.incidents[r.request_id] = "not stored"
                exp.console[r.request_id] = False
            if prometheus:
                exp.alerts[d] = False
                receiver = {"critical": "pager", "warning": "safety-queue"}.get(detectors[d].severity)
                if receiver:  # info detectors are recorded, not routed (blackhole receiver)
                    exp.pages[(receiver, d)] = False
    if not kafka:
        exp.skipped.append("Kafka events (no broker)")
    if not prometheus:
        exp.skipped.append("Prometheus alerts and pages (not installed)")
    return exp


def check(exp: Expectations, consumer: EventConsumer | None, stored: StoredIncidents | None, prom: Prometheus | None,
          receiver: WebhookReceiver | None, console: ConsoleClient | None = None) -> None:
    events = consumer.received() if consumer else []
    incidents = stored.received() if stored else []
    # A record tier (a detector's `record_threshold`) keeps an incident of a benign request now and then, by
    # design (5% of normal traffic for the demo's probes); what a flagged request must do, and a benign one
    # must never do, is reach the page tier.
    def page_tier(e: dict) -> bool:
        return tier_of(e["data"]) == "page"

    seen = {(e["subject"], e["data"]["detector"]) for e in events if page_tier(e)}
    for key in exp.kafka:
        exp.kafka[key] = key in seen
    paged = {e["subject"] for e in events + incidents if page_tier(e)}
    for rid in exp.benign_quiet:
        exp.benign_quiet[rid] = rid not in paged
    for rid in exp.incidents:
        exp.incidents[rid] = incident_problem([e for e in incidents if e["subject"] == rid])
    if receiver is not None:
        for e in incidents:
            if e["data"].get("outcome") != "answered" or e["data"].get("mode", "live") != "live":
                continue
            for x in e["data"]["detectors"]:
                raised = x["definition"].get("severity_if_answered")
                rcv = {"critical": "pager", "warning": "safety-queue"}.get(raised or "")
                if x["fired"] and rcv and raised != x["definition"]["severity"]:
                    exp.answered.setdefault((rcv, x["name"]), False)
    if console is not None and exp.console and not all(exp.console.values()):
        opened = console.pages_open()
        for rid in exp.console:
            exp.console[rid] = opened.get(rid) == 200
    if prom is not None:
        firing = {a["labels"].get("detector") for a in prom.alerts()
                  if a["labels"]["alertname"] == "MisalignmentDetectorFired" and a["state"] == "firing"}
        for d in exp.alerts:
            exp.alerts[d] = d in firing
    if receiver is not None:
        got = {(p.receiver, a["labels"].get("detector")) for p in receiver.received() if "alerts" in p.body
               for a in p.body["alerts"] if a["labels"]["alertname"] == "MisalignmentDetectorFired"}
        for key in exp.pages:
            exp.pages[key] = key in got
        answered = {(p.receiver, a["labels"].get("detector")) for p in receiver.received() if "alerts" in p.body
                    for a in p.body["alerts"] if a["labels"]["alertname"] == "MisalignmentModelAnswered"}
        for key in exp.answered:
            exp.answered[key] = key in answered


def wait(exp: Expectations, consumer, stored, prom, receiver, timeout: float, say, console=None) -> None:
    """Until every expected signal has arrived, or `timeout` seconds."""
    say("waiting for the signals: Kafka events consumed by group "
        f"'{CONSUMER_GROUP}', Prometheus alerts firing, pages received")
    deadline = time.time() + timeout
    last = None
    while True:
        check(exp, consumer, stored, prom, receiver, console)
        pending = exp.not_arrived()
        if not pending or time.time() > deadline:
            break
        if len(pending) != last:
            last = len(pending)
            say(f"  {len(pending)} signal(s) still to arrive")
        time.sleep(1)
    time.sleep(2)  # a benign request's (absent) event would have arrived with the others
    check(exp, consumer, stored, prom, receiver, console)


def wait_scraped(prom: Prometheus) -> None:
    """Until Prometheus holds the fire counters at 0: a fire is then an increase it can see."""
    deadline = time.time() + 60
    while not prom.query("misalignment_monitor_detector_fires_total"):
        if time.time() > deadline:
            raise SystemExit("Prometheus never scraped the sidecar; see the prometheus log in the run folder")
        time.sleep(0.5)
