"""`monitor demo --once`: the whole path with the real components, as a newcomer runs it.

vLLM (CPU, the demo model, the plugin) -> sidecar -> Kafka (read by a consumer group) and
Prometheus -> Alertmanager -> the pager webhook; benign requests must stay quiet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from binaries import binary

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
