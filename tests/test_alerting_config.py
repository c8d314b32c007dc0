"""Rules, routing and runbooks as shipped: promtool, amtool, and one loopback run through the real binaries."""

from __future__ import annotations

import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import yaml

from binaries import binary
from monitor.stack.alerting import (alertmanager_example, rules_file, Alertmanager, Prometheus, WebhookReceiver,
                                    local_alertmanager_config, local_prometheus_config)
from monitor.stack.vllm_server import free_port
from sidecar_helpers import open_ring, publish_request, start_service, tiny_monitor

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK_SECTIONS = ["Meaning", "Impact", "Diagnosis", "Mitigation", "Escalation", "Evidence to preserve", "Verify"]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(rules_file().read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def run(*argv: str, cwd: Path | None = None) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    assert res.returncode == 0, f"{' '.join(argv)}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_rules_pass_promtool_check_and_unit_tests():
    run(binary("promtool"), "check", "rules", str(rules_file()))
    out = run(binary("promtool"), "test", "rules", "rules.test.yml", cwd=rules_file().parent)
    assert "SUCCESS" in out


def test_every_alert_follows_the_conventions_and_has_a_runbook():
    names = []
    for rule in alert_rules():
        name = rule["alert"]
        names.append(name)
        ann = rule.get("annotations", {})
        assert {"summary", "description", "runbook_url"} <= ann.keys(), name
        assert "for" in rule, f"{name} has no `for`"
        # Severity is fixed by the rule, or carried from the metric (the detector's own severity).
        assert rule.get("labels", {}).get("severity") or "severity" in rule["expr"], name
        url = ann["runbook_url"]
        assert url.endswith(f"/{name.lower()}.md"), f"{name}: runbook_url must end in /{name.lower()}.md"
        page = ROOT / "runbooks" / url.rsplit("/", 1)[1]
        assert page.exists(), f"{name}: {url} does not resolve to a page in runbooks/"
        text = page.read_text()
        assert text.startswith(f"# {name}\n"), page
        headings = re.findall(r"^## (.+)$", text, flags=re.M)
        assert headings == RUNBOOK_SECTIONS, f"{page.name}: sections {headings}"
    assert len(names) == len(set(names))
    index = (ROOT / "runbooks/README.md").read_text()
    assert all(n in index for n in names)


def test_alertmanager_configs_check_and_route():
    amtool = binary("amtool")
    run(amtool, "check-config", str(alertmanager_example()))
    cases = {"pager": ["severity=critical", "alertname=MisalignmentDetectorFired", "detector=pii-probe"],
             "safety-queue": ["severity=warning", "alertname=MisalignmentMonitorRingDrops"],
             "blackhole": ["severity=info", "alertname=MisalignmentDetectorFired"],
             "deadmansswitch": ["severity=none", "alertname=MisalignmentMonitorWatchdog"]}
    for receiver, labels in cases.items():
        run(amtool, "config", "routes", "test", "--config.file", str(alertmanager_example()),
            f"--verify.receivers={receiver}", *labels)


def test_local_alertmanager_config_is_the_shipped_routing_on_loopback(tmp_path):
    cfg = local_alertmanager_config("http://127.0.0.1:9")
    shipped = yaml.safe_load(alertmanager_example().read_text())
    assert [r["receiver"] for r in cfg["route"]["routes"]] == [r["receiver"] for r in shipped["route"]["routes"]]
    assert cfg["inhibit_rules"] == shipped["inhibit_rules"]
    urls = re.findall(r"https?://[^'\"\s]+", yaml.safe_dump(cfg))
    assert urls and all(u.startswith("http://127.0.0.1:9/") for u in urls)
    path = tmp_path / "am.yml"
    path.write_text(yaml.safe_dump(cfg))
    run(binary("amtool"), "check-config", str(path))


def test_fire_reaches_the_pager_through_prometheus_and_alertmanager(tmp_path):
    """The sidecar's fire counter -> Prometheus rule -> Alertmanager route -> webhook and PagerDuty payloads.
    The same detector in shadow mode fires on the same request: counted, never paged; so does a detector whose
    score reached only its record tier."""
    binary("prometheus"), binary("prometheus-alertmanager")
    port = free_port()
    cfg = tiny_monitor(tmp_path, {"prometheus": {"port": port}}, severity="critical", shadow=True, tiered=50.0)
    ring = open_ring(tmp_path)
    thread, stop = start_service(cfg, ring)
    receiver = WebhookReceiver()
    try:
        with Alertmanager(tmp_path / "am").start(local_alertmanager_config(receiver.url)) as am, \
                Prometheus(tmp_path / "prom").start(local_prometheus_config(
                    f"127.0.0.1:{port}", None, am.address, console_url="https://monitor.example.com",
                    runbook_base_url="https://monitor.example.com/runbooks")) as prom:
            # Let Prometheus see the counter at 0 first: a fire is an increase from a known value.
            deadline = time.time() + 30
            while not prom.query('misalignment_monitor_detector_fires_total{detector="feat"}'):
                assert time.time() < deadline, "Prometheus never scraped the sidecar"
                time.sleep(0.5)
            publish_request(ring, [0.0, 9.0, 1.0], req="hot")
            t0 = time.time()
            pages = []
            while not pages:
                assert time.time() < t0 + 60, f"no page; alerts: {prom.alerts()}; am: {am.alerts()}"
                pages = [p for p in receiver.received() if p.receiver == "pager"]
                time.sleep(0.5)
            time.sleep(1)  # the PagerDuty payload and the webhook go out together
            pager = [p for p in receiver.received() if p.receiver == "pager"]
            hook = next(p for p in pager if "alerts" in p.body)
            alert = hook.body["alerts"][0]
            assert alert["labels"]["alertname"] == "MisalignmentDetectorFired"
            assert alert["labels"]["detector"] == "feat" and alert["labels"]["severity"] == "critical"
            # The deployment's own runbook, and the alert's landing page from 15 minutes before it was sent.
            assert alert["annotations"]["runbook_url"] == "https://monitor.example.com/runbooks/misalignmentdetectorfired.md"
            model = alert["labels"].get("model_name", "")
            landing, since = alert["annotations"]["console_url"].split("&since=")
            assert landing == f"https://monitor.example.com/alert?detector=feat&model={model}"
            sent = datetime.fromisoformat(alert["startsAt"].replace("Z", "+00:00")).timestamp()
            assert sent - 960 < int(since) / 1000 <= sent - 840, (since, alert["startsAt"])
            pd = [p for p in pager if "pagerduty" in p.path]
            assert pd and pd[0].body["event_action"] == "trigger" and pd[0].body["routing_key"] == "local-not-a-secret"
            assert pd[0].body["payload"]["custom_details"]["console"] == alert["annotations"]["console_url"]
            # Shadow: its fire is in Prometheus, yet no rule fired for it and Alertmanager never had it.
            shadow = prom.query('misalignment_monitor_detector_fires_total{detector="feat-shadow"}')
            assert shadow and shadow[0]["metric"]["mode"] == "shadow" and float(shadow[0]["value"][1]) == 1
            assert not any(a["labels"].get("detector") == "feat-shadow" for a in prom.alerts())
            assert not any(a["labels"].get("detector") == "feat-shadow" for a in am.alerts())
            assert all(a["labels"].get("detector") != "feat-shadow" for p in receiver.received() for a in p.body.get("alerts", []))
            # Record tier: counted under tier="record" (its page tier at 0), no rule fired, nothing sent.
            tiers = {s["metric"]["tier"]: float(s["value"][1])
                     for s in prom.query('misalignment_monitor_detector_fires_total{detector="feat-tiered"}')}
            assert tiers == {"record": 1.0, "page": 0.0}, tiers
            assert not any(a["labels"].get("detector") == "feat-tiered" for a in prom.alerts())
            assert all(a["labels"].get("detector") != "feat-tiered" for p in receiver.received() for a in p.body.get("alerts", []))
            # The watchdog reaches the dead man's switch; nothing went to the warning queue.
            assert any(p.receiver == "deadmansswitch" for p in receiver.received()), [(p.path, p.alertnames()) for p in receiver.received()]
            assert not any(p.receiver == "safety-queue" for p in receiver.received())
    finally:
        receiver.close()
        stop.set()
        thread.join(timeout=20)
        ring.close()
