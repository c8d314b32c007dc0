"""The demo's local stack: the test broker, the sidecar, vLLM with the plugin, Prometheus and Alertmanager.

Each component runs in its own process (as in production), on loopback; every one that starts is
stopped when the `ExitStack` closes. A component that cannot start here (no Prometheus installed,
no broker) is reported and the demo goes on without it.
"""

from __future__ import annotations

import os
import socket
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from monitor.paths import project_dir
from monitor.stack.alerting import (ALERTMANAGER_BIN, INSTALL_HINT, PROMETHEUS_BIN, Alertmanager, Prometheus,
                                    StackError, WebhookReceiver, find_binary, local_alertmanager_config,
                                    local_prometheus_config)
from monitor.stack.console_process import ConsoleProcess
from monitor.stack.ingester_process import IngesterProcess
from monitor.stack.kafka_broker import TansuBroker
from monitor.stack.sidecar_process import SidecarProcess
from monitor.stack.vllm_server import VLLMServer, free_port

TOPICS = ("misalignment-monitor.alerts", "misalignment-monitor.incidents")


def demo_config() -> Path:
    """The demo's monitor config, in the project checkout."""
    return project_dir() / "deploy/local/monitor.yaml"


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

def runtime_config(src: Path, run: Path, bootstrap: str | None, metrics_port: int, tokenizer: Path | None = None,
                   console_port: int | None = None, alertmanager_port: int | None = None) -> Path:
    """The demo config with its paths made absolute and the run's addresses filled in. With `tokenizer`
    (the served model's folder) the demo keeps the text of flagged requests (`evidence.text: flagged`);
    with `console_port`, alert events link to the console there, which reads the run's tokens file."""
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
        # The ingester's consumer group needs short timeouts to join on the test broker (environment brief).
        cfg["store"] = {"sqlite_path": str(run / "incidents.sqlite"), "consumer_group": "monitor-demo-store",
                        "max_poll_interval_ms": 3000, "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
    else:
        kafka["enabled"] = False
    sinks.setdefault("prometheus", {}).update(enabled=True, host="127.0.0.1", port=metrics_port)
    reveal = {}
    if tokenizer is not None:
        cfg.setdefault("evidence", {}).update(text="flagged", tokenizer=str(tokenizer))
        if console_port is not None:  # redacted values sealed to the demo console's key: it may reveal them
            private, public = _reveal_keys(run)
            cfg["evidence"]["reveal_public_key_file"] = str(public)
            reveal = {"reveal_key_file": str(private)}
    if console_port is not None:
        cfg["console"] = {"port": console_port, "base_url": f"http://127.0.0.1:{console_port}",
                          "tokens_file": str(run / "console-tokens.yaml"), **reveal,
                          **({"alertmanager_url": f"http://127.0.0.1:{alertmanager_port}"} if alertmanager_port else {})}
    out = run / "monitor.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _reveal_keys(run: Path) -> tuple[Path, Path]:
    """The demo console's key pair, made on the first run and kept (values sealed before stay revealable)."""
    from monitor.sinks.sealing import write_keypair

    private, public = run / "reveal.key", run / "reveal.pub"
    return (private, public) if private.exists() and public.exists() else write_keypair(run)


@dataclass
class LocalStack:
    """What the demo started, and where to reach it."""

    run: Path
    degraded: list[str] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    broker: TansuBroker | None = None
    server: VLLMServer | None = None
    prometheus: Prometheus | None = None
    alertmanager: Alertmanager | None = None
    receiver: WebhookReceiver | None = None
    metrics_port: int = 0
    console_port: int = 0
    alertmanager_port: int = 0
    console_token: str | None = None
    checks_token: str | None = None

    def _degrade(self, msg: str, say) -> None:
        say(f"WARNING: {msg}")
        self.degraded.append(msg)

    def have_alerting(self, say) -> bool:
        for binary, what in ((PROMETHEUS_BIN, "Prometheus"), (ALERTMANAGER_BIN, "Alertmanager")):
            try:
                find_binary(binary)
            except StackError:
                self._degrade(f"{what} is not installed ({INSTALL_HINT}): running without Prometheus, Alertmanager "
                              "and pages", say)
                return False
        return True

    def start_kafka(self, stack: ExitStack, say) -> None:
        try:
            self.broker = stack.enter_context(TansuBroker(port=port(9092), log_path=self.run / "kafka.log"))
        except (RuntimeError, TimeoutError, OSError) as e:
            self._degrade(f"the test Kafka broker could not start ({e}): running without Kafka events", say)
            return
        for topic in TOPICS:
            self.broker.create_topic(topic)
        self.urls["kafka_bootstrap"] = self.broker.bootstrap
        say(f"Kafka-protocol broker (tansu) at {self.broker.bootstrap}")

    def start_sidecar(self, stack: ExitStack, cfg: Path, say) -> None:
        side = SidecarProcess(cfg, self.metrics_port, self.run / "sidecar.log", decisions=self.run / "decisions.jsonl")
        try:
            stack.enter_context(side)
        except RuntimeError as e:
            raise SystemExit(str(e))
        self.urls["sidecar_metrics"] = f"{side.url}/metrics"
        say(f"sidecar ready: {side.url}/metrics (log: {self.run / 'sidecar.log'})")

    def start_ingester(self, stack: ExitStack, cfg: Path, say) -> None:
        try:
            stack.enter_context(IngesterProcess(cfg, self.run / "ingester.log"))
        except RuntimeError as e:
            raise SystemExit(str(e))
        self.urls["incident_store"] = f"sqlite:///{self.run / 'incidents.sqlite'}"
        say(f"incident ingester writing {self.run / 'incidents.sqlite'} (log: {self.run / 'ingester.log'})")

    def start_console(self, stack: ExitStack, cfg: Path, say) -> None:
        """The console over the run's store, with an admin token that may see text (printed: a local demo)."""
        from monitor.console.tokens_file import add_token

        self.console_token = add_token(self.run / "console-tokens.yaml", "demo", "admin", True, None)
        # The demo's own checks read every incident page: as a viewer without the text permission, so the
        # audit log shows the person's reads, not the demo's.
        self.checks_token = add_token(self.run / "console-tokens.yaml", "demo-checks", "viewer", False, None)
        try:
            console = stack.enter_context(ConsoleProcess(cfg, self.console_port, self.run / "console.log"))
        except RuntimeError as e:
            raise SystemExit(str(e))
        self.urls["console"] = f"{console.url}/incidents"
        say(f"console {console.url}/incidents (log: {self.run / 'console.log'}); log in with the demo token:")
        print(self.console_token, flush=True)  # alone on its line, so a triple-click copies exactly the token

    def start_vllm(self, stack: ExitStack, model: Path, served_name: str, cfg: Path, eager: bool, say) -> VLLMServer:
        self.server = VLLMServer(model, served_name=served_name, monitor_config=cfg, port=port(8000), eager=eager,
                                 log_path=self.run / "vllm.log")
        say(f"starting vLLM with the plugin (log: {self.run / 'vllm.log'})")
        stack.enter_context(self.server)
        self.urls["openai"] = f"{self.server.url}/v1/models"
        self.urls["vllm_metrics"] = f"{self.server.url}/metrics"
        return self.server

    def start_alerting(self, stack: ExitStack, say) -> None:
        self.receiver = WebhookReceiver(port=port(9097))
        stack.callback(self.receiver.close)
        self.alertmanager = stack.enter_context(Alertmanager(self.run / "alertmanager", self.alertmanager_port or port(9093)).start(
            local_alertmanager_config(self.receiver.url)))
        self.prometheus = stack.enter_context(Prometheus(self.run / "prometheus", port(9090)).start(
            local_prometheus_config(f"127.0.0.1:{self.metrics_port}", f"127.0.0.1:{self.server.port}",
                                    self.alertmanager.address,
                                    console_url=f"http://127.0.0.1:{self.console_port}" if self.console_token else None,
                                    runbook_base_url=(f"http://127.0.0.1:{self.console_port}/runbooks"
                                                      if self.console_token else None))))
        # Every link printed opens in a browser: Debian's Alertmanager has no web UI, so its alerts are
        # listed by the console (through Alertmanager's API) and the API itself is printed beside it.
        self.urls.update(prometheus=self.prometheus.url, prometheus_alerts=self.prometheus.alerts_page(),
                         alertmanager_alerts=(f"http://127.0.0.1:{self.console_port}/alerts" if self.console_token
                                              else f"{self.alertmanager.url}/api/v2/alerts"),
                         alertmanager_api=f"{self.alertmanager.url}/api/v2/alerts", pager_receiver=self.receiver.url)
        say(f"Prometheus {self.prometheus.url} (rules: deploy/prometheus/rules.yml), Alertmanager "
            f"{self.alertmanager.url}, pager receiver {self.receiver.url}")
