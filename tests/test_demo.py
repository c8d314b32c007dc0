"""`monitor demo --once`: the whole path with the real components, as a newcomer runs it.

vLLM (CPU, the demo model, the plugin) -> sidecar -> Kafka (read by a consumer group) and
Prometheus -> Alertmanager -> the pager webhook; benign requests must page nobody.
"""

from __future__ import annotations

import json
import re
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
    # The probes' record tier keeps about 5% of normal conversations for review: a benign request may reach it,
    # never the page tier.
    assert len(benign) >= 3 and all(v["tier"] == "record" for r in benign for v in r["fired"].values())
    for r in summary["requests"]:
        assert set(r["expected"]) <= {d for d, v in r["fired"].items() if v["tier"] == "page"}, r
    pii = by_name["pii-email"]["fired"]["pii-probe"]
    assert pii["score"] >= pii["threshold"] and pii["severity"] == "critical"
    # Why: the top tokens, with the probe's per-token contribution, positioned inside the prompt.
    assert pii["top_tokens"] and all(t["inputs"] for t in pii["top_tokens"])


def test_events_pages_and_alerts_line_up(summary):
    events = summary["kafka_events"]
    assert len({e["id"] for e in events}) == len(events) == summary["kafka"]["events"]
    paged = {e["subject"] for e in events if e["data"]["tier"] == "page"}
    assert paged == {r["request_id"] for r in summary["requests"] if r["expected"]}
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
    assert len({i["request_id"] for i in incidents}) == len(incidents)  # one per request at most
    # One page-tier incident for each flagged request, none for a benign one (which may leave a record-tier one).
    assert sorted(i["request_id"] for i in incidents if i["tier"] == "page") == sorted(flagged)
    for i in incidents:
        assert i["tokens_traced"] > i["prompt_tokens"] and i["context_tokens"] > 0 and i["text_policy"] == "flagged"
        assert set(i["words_around_the_top_token"]) == set(i["detectors"])
        assert all(w.strip() for w in i["words_around_the_top_token"].values())
    by_id = {i["request_id"]: i for i in incidents}
    pii = next(r for r in summary["requests"] if r["name"] == "pii-email")
    assert set(by_id[pii["request_id"]]["alert_ids"]) == {
        e["data"]["alert_id"] for e in summary["kafka_events"] if e["subject"] == pii["request_id"]}
    table = next(r for r in summary["requests"] if r["name"] == "pii-table")
    # The SSN, the date of birth and the card (valid checksum) never left the sidecar (Presidio's recognizers).
    assert {"us-ssn", "date-time", "credit-card"} <= set(by_id[table["request_id"]]["redacted_by"])
    assert {"email-address", "phone-number"} <= set(by_id[pii["request_id"]]["redacted_by"])


def test_the_model_answering_a_harmful_request_pages(summary):
    """harmful-request-probe only warns (the queue) when a harmful request arrives; its pack raises it to
    critical when the model answered. The sidecar reads the reply: an answer pages (MisalignmentModelAnswered),
    a refusal does not. What SmolLM2 replies decides which; both branches are checked against its reply."""
    from monitor.sinks.reply import reply_outcome

    phishing = next(r for r in summary["requests"] if r["name"] == "phishing")
    inc = next(i for i in summary["incidents"] if i["request_id"] == phishing["request_id"])
    # The sidecar's reading agrees with the reply the demo client received.
    client_side = reply_outcome([phishing["answer"]], [1], 1).outcome
    assert inc["outcome"] == client_side, (inc["outcome"], phishing["answer"][:200])
    answered_pages = {(p["receiver"], a["detector"]) for p in summary["pages"] for a in p["alerts"]
                      if a["alertname"] == "MisalignmentModelAnswered"}
    assert all(d == "harmful-request-probe" for _, d in answered_pages)  # no other pack raises its severity
    if inc["outcome"] == "answered":
        assert inc["severities"]["harmful-request-probe"] == "critical"
        assert ("pager", "harmful-request-probe") in answered_pages
    else:
        assert inc["severities"]["harmful-request-probe"] == "warning" and not answered_pages


def test_demo_links_pages_and_events_to_the_console(summary):
    console = summary["console"]
    pages = [a for p in summary["pages"] for a in p["alerts"] if a["alertname"] == "MisalignmentDetectorFired"]
    assert pages and all(a["console_url"].startswith(f"{console['url']}/alert?detector={a['detector']}&model=")
                         and "&since=" in a["console_url"] for a in pages)
    assert all(e["data"]["console_url"] == f"{console['url']}/incidents/{e['data']['alert_id']}"
               for e in summary["kafka_events"])


def test_every_link_the_demo_prints_answers(summary):
    """Prometheus' alerts page for the installed version, the alerts view, the pager's page, the console and
    each alert's landing page: 200 each, as the demo found them while it ran."""
    links = summary["links"]
    assert {"prometheus_alerts", "alertmanager_alerts", "pager_receiver", "console", "openai", "alert_page_0"} <= set(links)
    assert all(status == 200 for status in links.values()), links
    assert summary["urls"]["prometheus_alerts"].endswith("/alerts")  # /classic/alerts on Debian's 2.42
    # The token alone on its line (a triple-click copies exactly it), where the demo first says it and in the report.
    lines = [part.splitlines()[1] for part in summary["_stdout"].split("log in with the demo token:")[1:]]
    assert lines and all(line == summary["console"]["token"] for line in lines)


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
            expect(page.locator("table.incidents tbody tr")).to_have_count(len(summary["incidents"]))
            # Filter to one detector (the chip counts say how many each has).
            page.select_option("select[name=detector]", "pii-probe")
            page.click("#apply")
            assert "detector=pii-probe" in page.url
            rows = page.locator("table.incidents tbody tr")
            n_pii = sum("pii-probe" in i["detectors"] for i in summary["incidents"])
            expect(rows).to_have_count(n_pii)
            page.screenshot(path=str(shots / "console-list.png"), full_page=True)
            # Open the PII request's incident from the list.
            page.locator(f"a[href='/incidents/{incident['alert_ids'][0]}']").first.click()
            headline = page.locator("#headline").inner_text()
            assert headline.startswith("pii-probe flagged this conversation") or "flagged this conversation" in headline
            # The probe's strongest tokens are inside the redacted e-mail and phone: empty, drawn as shaded slivers.
            shaded = page.locator("#strip .tok.ev")
            assert shaded.count() >= 1
            assert shaded.first.bounding_box()["width"] > 0
            bg = shaded.first.evaluate("e => getComputedStyle(e).backgroundColor")
            assert bg not in ("rgba(0, 0, 0, 0)", "transparent")
            strip = page.locator("#strip").inner_text()
            assert "[EMAIL_ADDRESS]" in strip and "maria.garcia84" not in strip  # redacted in the sidecar
            # Sealed to this console's key: an admin with the text permission may reveal it (audited).
            page.click("#reveal")
            expect(page.locator("#revealed")).to_be_visible()
            assert "maria.garcia84" in page.locator("#strip").inner_text().replace(" ", "")
            page.go_back()
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
            assert "[EMAIL_ADDRESS]" in exported["messages"][1]["content"]
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


def test_from_the_page_to_a_decision_in_a_real_browser(summary, console_site):
    """The on-call path: the page Alertmanager delivered (its console_url) -> the alert's landing page ->
    the incident, whose first screen answers which words, how sure, did the model go along, seen before,
    and what to do (the runbook this console serves) -> a verdict."""
    from urllib.parse import urlsplit

    from playwright.sync_api import expect, sync_playwright

    url, admin, _ = console_site
    paged = next(a for p in summary["pages"] if p["receiver"] == "pager" for a in p["alerts"]
                 if a["alertname"] == "MisalignmentDetectorFired" and a["detector"] == "prompt-injection-probe")
    landing = urlsplit(paged["console_url"])
    injection = next(r for r in summary["requests"] if r["name"] == "injection")
    shots = ROOT / "docs" / "images"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary("chromium"), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            # The page's link, on this console (the demo's has stopped): the login form, then the alert.
            r = page.goto(f"{url}{landing.path}?{landing.query}")
            assert r.status == 401
            page.fill("#token", admin)
            page.click("#login")
            expect(page.locator("#alert-headline")).to_contain_text("behind this alert")
            top = page.locator("#alert-incident-0")
            assert top.get_attribute("open") is not None  # the newest is open; the rest are one line each
            assert "prompt-injection-probe flagged this conversation" in top.inner_text()
            page.screenshot(path=str(shots / "console-alert.png"), full_page=True)
            top.locator("a.open-incident").click()
            # 1. Which words made which detector fire.
            headline = page.locator("#headline").inner_text()
            assert "prompt-injection-probe" in headline and ("Ignore" in headline or "instructions" in headline)
            assert injection["request_id"] in page.locator(".headline .meta").inner_text()
            # 2. How sure, in plain words, from the calibration.
            assert re.search(r"about 1 in \d+ normal conversations", page.locator("#how-sure").inner_text().lower())
            # 3. Did the model go along: what its reply opened with.
            outcome = page.locator("#outcome").inner_text()
            assert outcome.startswith(("The model refused", "The model answered"))
            assert injection["answer"].split()[0] in outcome
            # 4. Seen before, and what to do: the runbook's first steps, and the runbook this console serves.
            assert "judged" in page.locator("#similar").inner_text()
            assert "True positive" in page.locator("#first-steps").inner_text()
            page.screenshot(path=str(shots / "console-decide.png"))
            page.check("input[value=true_positive]")
            page.fill("#note", "a jailbreak attempt, confirmed")
            page.click("#save-verdict")
            expect(page.locator("#verdict")).to_have_text("true positive")
            # What if its threshold were higher: the fire just judged, against a candidate above its score.
            page.click("#whatif-link")
            expect(page.locator("#whatif-kept")).to_have_text("1")
            score = float(page.locator("#whatif-fires tbody tr td.n").first.inner_text())
            page.fill("#threshold", f"{score + 0.0001:.6g}")  # just above it (the table rounds to 4 digits)
            page.click("#whatif-apply")
            expect(page.locator("#whatif-kept")).to_have_text("0")
            expect(page.locator("#whatif-recall")).to_have_text("0%")  # the true positive just judged is lost
            page.screenshot(path=str(shots / "console-whatif.png"))
            page.go_back()
            page.go_back()
            page.click("#runbook-first")
            expect(page.locator("#runbook h2").first).to_have_text("Meaning")
            assert "/runbooks/misalignmentdetectorfired.md" in page.url
            assert page.request.get(f"{url}/favicon.ico").status == 200
        finally:
            browser.close()
