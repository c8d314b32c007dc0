"""`monitor demo --once`: the whole path with the real components, as a newcomer runs it.

vLLM (CPU, the demo model, the plugin) -> sidecar -> Kafka (read by a consumer group) and
Prometheus -> Alertmanager -> the pager webhook; benign requests must stay quiet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from binaries import binary

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def summary(model_dir, tmp_path_factory) -> dict:
    binary("prometheus"), binary("prometheus-alertmanager")
    out = tmp_path_factory.mktemp("demo") / "summary.json"
    res = subprocess.run([sys.executable, "-m", "monitor.cli", "demo", "--once", "--summary-json", str(out)],
                         capture_output=True, text=True, timeout=1100, env=dict(os.environ))
    assert out.exists(), f"no summary; exit {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    doc["_exit"], doc["_stdout"] = res.returncode, res.stdout
    return doc


def test_demo_once_delivers_every_signal(summary):
    assert summary["ok"] and summary["_exit"] == 0, (summary["missing"], summary["_stdout"][-3000:])
    assert not summary["degraded"]


def test_flagged_requests_fire_their_detectors_and_benign_ones_do_not(summary):
    by_name = {r["name"]: r for r in summary["requests"]}
    benign = [r for r in summary["requests"] if not r["expected"]]
    assert len(benign) >= 3 and all(r["fired"] == {} for r in benign)
    for r in summary["requests"]:
        assert set(r["expected"]) <= set(r["fired"]), r
    pii = by_name["pii-email"]["fired"]["pii-probe"]
    assert pii["score"] >= pii["threshold"] and pii["severity"] == "critical"
    # Why: the top tokens, with the probe's per-token contribution, positioned inside the prompt.
    assert pii["top_tokens"] and all(t["inputs"] for t in pii["top_tokens"])


def test_events_pages_and_alerts_line_up(summary):
    events = summary["kafka_events"]
    assert len({e["id"] for e in events}) == len(events) == summary["kafka"]["events"]
    assert {e["subject"] for e in events} == {r["request_id"] for r in summary["requests"] if r["expected"]}
    assert all("text" not in t for e in events for t in e["data"]["tokens"])  # privacy default: no text
    firing = {a["labels"]["detector"] for a in summary["prometheus_alerts"]
              if a["alertname"] == "MisalignmentDetectorFired" and a["state"] == "firing"}
    assert {"pii-probe", "prompt-injection-probe", "harmful-request-probe"} <= firing
    paged = {(p["receiver"], a["detector"]) for p in summary["pages"] for a in p["alerts"]}
    assert ("pager", "pii-probe") in paged and ("pager", "prompt-injection-probe") in paged
    assert ("safety-queue", "harmful-request-probe") in paged  # warning: the queue, not the pager
    assert not any(d == "pii-sae-feature" for _, d in paged)  # info: recorded, not routed
    assert any("pagerduty" in p["path"] for p in summary["pages"])


def test_every_flagged_request_leaves_one_incident_with_its_words(summary):
    flagged = {r["request_id"] for r in summary["requests"] if r["expected"]}
    incidents = summary["incidents"]
    assert sorted(i["request_id"] for i in incidents) == sorted(flagged)  # exactly one each, none for benign
    for i in incidents:
        assert i["tokens_traced"] > i["prompt_tokens"] and i["context_tokens"] > 0 and i["text_policy"] == "flagged"
        assert set(i["words_around_the_top_token"]) == set(i["detectors"])
        assert all(w.strip() for w in i["words_around_the_top_token"].values())
    by_id = {i["request_id"]: i for i in incidents}
    pii = next(r for r in summary["requests"] if r["name"] == "pii-email")
    assert set(by_id[pii["request_id"]]["alert_ids"]) == {
        e["data"]["alert_id"] for e in summary["kafka_events"] if e["subject"] == pii["request_id"]}
    table = next(r for r in summary["requests"] if r["name"] == "pii-table")
    assert by_id[table["request_id"]]["redacted_by"] == ["us-ssn"]  # the SSN never left the sidecar


def test_demo_links_pages_and_events_to_the_console(summary):
    console = summary["console"]
    pages = [a for p in summary["pages"] for a in p["alerts"] if a["alertname"] == "MisalignmentDetectorFired"]
    assert pages and all(a["console_url"].startswith(f"{console['url']}/incidents?detector={a['detector']}")
                         for a in pages)
    assert all(e["data"]["console_url"] == f"{console['url']}/incidents/{e['data']['alert_id']}"
               for e in summary["kafka_events"])


@pytest.fixture(scope="module")
def console_site(summary, tmp_path_factory):
    """The console over the demo run's store (the demo has stopped; its store and tokens file stay)."""
    import yaml

    from monitor.console.tokens_file import add_token
    from monitor.stack.console_process import ConsoleProcess
    from monitor.stack.vllm_server import free_port

    cfg_path = summary["console"]["config"]
    tokens = yaml.safe_load(open(cfg_path))["console"]["tokens_file"]
    viewer = add_token(tokens, "viewer-test", "viewer", False, None)
    log = tmp_path_factory.mktemp("console") / "console.log"
    with ConsoleProcess(cfg_path, free_port(), log) as c:
        yield c.url, summary["console"]["token"], viewer


def test_console_in_a_real_browser(summary, console_site, tmp_path):
    """Chromium (Debian's) through Playwright: log in, list, filter, open the demo's PII incident, see the
    shaded words and the heatmap, mark it a false positive, export it, log out; a viewer may neither
    triage nor read text; no token gets 401. The screenshots in docs/console.md come from here."""
    from playwright.sync_api import expect, sync_playwright

    url, admin, viewer = console_site
    pii = next(r for r in summary["requests"] if r["name"] == "pii-email")
    incident = next(i for i in summary["incidents"] if i["request_id"] == pii["request_id"])
    flagged = [r for r in summary["requests"] if r["expected"]]
    shots = ROOT / "docs" / "images"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary("chromium"), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        try:
            # No token: 401, and the login form.
            r = page.goto(f"{url}/incidents")
            assert r.status == 401 and page.locator("#token").is_visible()
            assert page.goto(f"{url}/api/incidents").status == 401
            page.goto(f"{url}/login")
            page.fill("#token", admin)
            page.click("#login")
            expect(page.locator("table.incidents tbody tr")).to_have_count(len(flagged))
            # Filter to one detector (the chip counts say how many each has).
            page.select_option("select[name=detector]", "pii-probe")
            page.click("#apply")
            assert "detector=pii-probe" in page.url
            rows = page.locator("table.incidents tbody tr")
            n_pii = sum("pii-probe" in r["fired"] for r in flagged)
            expect(rows).to_have_count(n_pii)
            page.screenshot(path=str(shots / "console-list.png"), full_page=True)
            # Open the PII request's incident from the list.
            page.locator(f"a[href='/incidents/{incident['alert_ids'][0]}']").first.click()
            headline = page.locator("#headline").inner_text()
            assert headline.startswith("pii-probe flagged this conversation") or "flagged this conversation" in headline
            shaded = page.locator("#strip .tok.ev")
            assert shaded.count() >= 1
            bg = shaded.first.evaluate("e => getComputedStyle(e).backgroundColor")
            assert bg not in ("rgba(0, 0, 0, 0)", "transparent")
            assert "maria" in page.locator("#strip").inner_text().lower() or "@" in page.locator("#strip").inner_text()
            cells = page.locator("#heatmap rect")
            assert cells.count() >= 2 * page.locator("#strip .tok").count()
            shaded.first.hover()  # the small script links a word to its heatmap column
            assert page.locator("#heatmap rect.hl").count() >= 2
            page.screenshot(path=str(shots / "console-incident.png"), full_page=True)
            # Triage: a false positive, with a note.
            page.check("#fp")
            page.fill("#note", "test data, not a customer")
            page.click("#save-verdict")
            expect(page.locator("#verdict")).to_have_text("false positive")
            with page.expect_download() as dl:
                page.click("#export-one")
            exported = json.loads(open(dl.value.path()).read())
            # SmolLM2's template adds its default system prompt: the export keeps what the model was given.
            assert exported["labels"]["pii"] == 0
            assert [m["role"] for m in exported["messages"]] == ["system", "user", "assistant"]
            assert "maria.garcia84@gmail.com" in exported["messages"][1]["content"]
            page.click("#logout")
            assert page.goto(f"{url}/incidents").status == 401
            # A viewer: scores yes, text and triage no.
            page.goto(f"{url}/login")
            page.fill("#token", viewer)
            page.click("#login")
            page.goto(f"{url}/incidents/{incident['alert_ids'][0]}")
            assert page.locator("#text-hidden").is_visible()
            assert page.locator("#save-verdict").count() == 0
            assert "maria" not in page.content().lower()
        finally:
            browser.close()
