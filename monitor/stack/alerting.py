"""The local alerting stack: Prometheus and Alertmanager (the Debian builds) and a receiver for pages.

Used by `monitor demo` and the tests. The configs are derived from the files we ship
(`deploy/prometheus/rules.yml`, `deploy/alertmanager/alertmanager.yml`) rather than written again,
so the demo exercises the routing users deploy: only receivers move to loopback and waits shrink.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from monitor.paths import project_dir
from monitor.stack.process import http_ok, stop_process_group, wait_ready
from monitor.stack.vllm_server import free_port

def rules_file() -> Path:
    """The shipped Prometheus rules, in the project checkout."""
    return project_dir() / "deploy/prometheus/rules.yml"


def alertmanager_example() -> Path:
    """The shipped Alertmanager routing, in the project checkout."""
    return project_dir() / "deploy/alertmanager/alertmanager.yml"
PROMETHEUS_BIN = "prometheus"
ALERTMANAGER_BIN = "prometheus-alertmanager"  # Debian's name for the alertmanager binary
INSTALL_HINT = "apt-get install prometheus prometheus-alertmanager (or `make system-deps`)"


class StackError(RuntimeError):
    pass


def find_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise StackError(f"`{name}` is not installed: {INSTALL_HINT}")
    return path


def local_alertmanager_config(receiver_url: str, example: Path | None = None) -> dict:
    """The shipped routing with every receiver pointed at `receiver_url/<receiver>` and short waits."""
    cfg = copy.deepcopy(yaml.safe_load((example or alertmanager_example()).read_text()))
    cfg["route"].update(group_wait="1s", group_interval="5s")
    for receiver in cfg.get("receivers", []):
        name = receiver["name"]
        for pd in receiver.get("pagerduty_configs", []):
            pd.pop("routing_key_file", None)
            pd.pop("service_key_file", None)
            pd["routing_key"] = "local-not-a-secret"
            pd["url"] = f"{receiver_url}/{name}/pagerduty/v2/enqueue"  # PagerDuty's Events API v2 path
        for wh in receiver.get("webhook_configs", []):
            wh["url"] = f"{receiver_url}/{name}"
    return cfg


def local_prometheus_config(sidecar: str, vllm: str | None, alertmanager: str, rules: Path | None = None,
                            interval: str = "1s", console_url: str | None = None,
                            runbook_base_url: str | None = None) -> dict:
    """With `console_url`, the detector alerts' `console_url` annotation links to the console; with
    `runbook_base_url`, every alert's `runbook_url` goes there instead of the project's repository."""
    scrape = [{"job_name": "misalignment-monitor", "static_configs": [{"targets": [sidecar]}]}]
    if vllm:
        scrape.append({"job_name": "vllm", "static_configs": [{"targets": [vllm]}]})
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval,
                   **({"external_labels": labels} if (labels := {k: v for k, v in (
                       ("console_url", console_url), ("runbook_base_url", runbook_base_url)) if v}) else {})},
        "rule_files": [str(rules or rules_file())],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": scrape,
    }


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


class _Process:
    """A binary started with a config under `workdir`, on a loopback port, stopped with its group."""

    name = ""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / f"{self.name}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def argv(self, config_file: Path) -> list[str]:
        raise NotImplementedError

    def start(self, config: dict):
        """Write `config` into the work folder, start the binary on it, return once it is ready."""
        path = self.workdir / f"{self.name}.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc = subprocess.Popen(self.argv(path), stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_ready(self.proc, http_ok(f"{self.url}/-/ready"), self.name, self.log, timeout=30)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, timeout=10)
            self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Prometheus(_Process):
    name = "prometheus"

    def argv(self, config_file: Path) -> list[str]:
        return [find_binary(PROMETHEUS_BIN), f"--config.file={config_file}", f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address={self.address}", "--web.enable-lifecycle", "--log.level=warn",
                # Alerts that fire before Alertmanager is discovered (~5 s) would wait out the
                # default 1 min resend delay.
                "--rules.alert.resend-delay=1s"]

    def alerts(self) -> list[dict]:
        return _get_json(f"{self.url}/api/v1/alerts")["data"]["alerts"]

    def alerts_page(self) -> str:
        """The web page listing the alerts, where this build has one: `/alerts` in the React UI, `/classic/alerts`
        in builds without it (Debian's 2.42 answers 404 to `/alerts`)."""
        for path in ("/alerts", "/classic/alerts"):
            if http_ok(f"{self.url}{path}", timeout=3)():
                return f"{self.url}{path}"
        return f"{self.url}/api/v1/alerts"

    def query(self, promql: str) -> list[dict]:
        q = urllib.parse.urlencode({"query": promql})
        return _get_json(f"{self.url}/api/v1/query?{q}")["data"]["result"]


class Alertmanager(_Process):
    name = "alertmanager"

    def argv(self, config_file: Path) -> list[str]:
        # An empty cluster address turns gossip off: no second port, nothing beyond loopback.
        return [find_binary(ALERTMANAGER_BIN), f"--config.file={config_file}", f"--storage.path={self.workdir / 'data'}",
                f"--web.listen-address={self.address}", "--cluster.listen-address=", "--log.level=warn"]

    def alerts(self) -> list[dict]:
        return json.loads(urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5).read())


@dataclass
class Page:
    path: str  # "/pager", "/pager/pagerduty/v2/enqueue", "/safety-queue", ...
    body: dict
    received: float = field(default_factory=time.time)

    @property
    def receiver(self) -> str:
        return self.path.strip("/").split("/")[0]

    def alertnames(self) -> list[str]:
        if "alerts" in self.body:  # Alertmanager's webhook payload
            return [a["labels"].get("alertname", "") for a in self.body["alerts"]]
        return []


class WebhookReceiver:
    """Stands in for the pager: records every POST (Alertmanager webhooks, PagerDuty Events API v2)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.pages: list[Page] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    doc = json.loads(body)
                except ValueError:
                    doc = {"raw": body.decode(errors="replace")}
                with receiver._lock:
                    receiver.pages.append(Page(self.path, doc))
                answer = b'{"status":"success","message":"Event processed"}'
                self.send_response(202 if "pagerduty" in self.path else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def do_GET(self) -> None:  # noqa: N802 - a person opening the pager's URL sees what it received
                answer = receiver.html().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, name="webhook-receiver", daemon=True).start()

    def received(self) -> list[Page]:
        with self._lock:
            return list(self.pages)

    def html(self) -> str:
        """The pages received, newest first, each with its links: what the person paged would click."""
        from html import escape

        def link(url: str | None, text: str) -> str:
            return f'<a href="{escape(url)}">{text}</a>' if url else ""

        rows = []
        for p in reversed(self.received()):
            when = time.strftime("%H:%M:%S", time.localtime(p.received))
            for a in p.body.get("alerts", []):
                lab, ann = a.get("labels", {}), a.get("annotations", {})
                rows.append(f"<tr><td>{when}</td><td>{escape(p.receiver)}</td><td>{escape(a.get('status', ''))}</td>"
                            f"<td>{escape(lab.get('alertname', ''))}</td><td>{escape(lab.get('detector', ''))}</td>"
                            f"<td>{escape(lab.get('severity', ''))}</td><td>{escape(ann.get('summary', ''))}</td>"
                            f"<td>{link(ann.get('console_url'), 'console')} {link(ann.get('runbook_url'), 'runbook')}</td></tr>")
            if "payload" in p.body:  # PagerDuty Events API v2
                d = p.body["payload"].get("custom_details", {})
                rows.append(f"<tr><td>{when}</td><td>{escape(p.receiver)} (PagerDuty)</td>"
                            f"<td>{escape(p.body.get('event_action', ''))}</td><td colspan=3></td>"
                            f"<td>{escape(p.body['payload'].get('summary', ''))}</td>"
                            f"<td>{link(d.get('console'), 'console')} {link(d.get('runbook'), 'runbook')}</td></tr>")
        body = "".join(rows) or '<tr><td colspan="8">Nothing received yet.</td></tr>'
        return ("<!doctype html><meta charset=utf-8><title>Pages received</title>"
                "<style>body{font:14px system-ui;margin:1.5em}td,th{border-bottom:1px solid #ddd;padding:.3em .6em;"
                "text-align:left}</style><h1>Pages received</h1><p>This receiver stands in for the pager (PagerDuty, "
                "the incident webhook): every notification Alertmanager sent it, newest first.</p>"
                "<table><tr><th>When</th><th>Receiver</th><th>Status</th><th>Alert</th><th>Detector</th>"
                f"<th>Severity</th><th>Summary</th><th>Links</th></tr>{body}</table>")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
