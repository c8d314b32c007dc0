"""Threshold tiers: a detector records an incident at a lower threshold (tier `record`) and pages at its
`threshold` (tier `page`), both calibrated from the same benign set, each with its provenance. The alert,
the incident, the metrics and the console say which tier fired; only the page tier pages (the rules are
checked with promtool in rules.test.yml and through a real Prometheus in test_alerting_config.py) and acts."""

from __future__ import annotations

import json
import time
import urllib.request

import jsonschema
import numpy as np
import pytest
import yaml

from incident_factory import make_events
from monitor.config.models import DetectorSpec
from monitor.detectors.aggregate import Ragged
from monitor.detectors.runtime import CompiledDetector, DetectorBank, InputRef
from monitor.sinks.events import EventBuilder, alert_schema
from monitor.sinks.incidents import incident_schema
from monitor.stack.vllm_server import free_port
from monitor.transport.meta import Segment, SlotMeta
from sidecar_helpers import open_ring, start_service, tiny_monitor
from test_console import NOW, Site

TIERED = {"name": "harm", "concept": "harm", "inputs": [{"sae": "s", "feature": 3}], "aggregation": {"kind": "max"},
          "record_threshold": 2.0, "threshold": 5.0, "severity": "critical", "action": "abort"}


def test_tiers_must_be_in_order_and_described():
    with pytest.raises(ValueError, match="record_threshold 5 must be below threshold 5"):
        DetectorSpec.model_validate(TIERED | {"record_threshold": 5.0})
    with pytest.raises(ValueError, match="record_calibration describes a record_threshold, which is not set"):
        DetectorSpec.model_validate({k: v for k, v in TIERED.items() if k != "record_threshold"} | {
            "record_calibration": {"threshold": 2.0, "target_fpr": 0.05}})
    spec = DetectorSpec.model_validate(TIERED)
    assert [spec.tier_of(x) for x in (1.0, 2.0, 4.9, 5.0)] == [None, "record", "record", "page"]


def _feed(bank: DetectorBank, values: list[float]):
    pos = np.arange(len(values))
    return bank.update(Ragged.of(np.array([0]), np.array([0]), np.array([len(values)])), pos,
                       {"sae:s": np.array(values, np.float32)[:, None]})


def test_an_alert_fires_at_record_then_escalates_to_page_once():
    """Events: revision 0 at `record` (threshold 2, no action), revision 1 when the same alert reaches `page`
    (threshold 5, the detector's action), then the final verdict at `page`."""
    spec = DetectorSpec.model_validate(TIERED)
    bank = DetectorBank(CompiledDetector(spec, [InputRef("sae:s", 0, 1.0, False, "s/3")]), capacity=1)
    builder = EventBuilder(model="m", deployment="d")
    step = _feed(bank, [0.0, 3.0])
    assert step.fired.tolist() == [0] and step.escalated.tolist() == [] and bank.tier(0) == "record"
    first = builder.build(bank.snapshot(0, "r", "r", "chatcmpl-r", 0, fired_now=True, final=False))
    step = _feed(bank, [4.0])
    assert step.fired.tolist() == [] and step.escalated.tolist() == []  # still record
    step = _feed(bank, [7.0])
    assert step.fired.tolist() == [] and step.escalated.tolist() == [0] and bank.tier(0) == "page"
    up = bank.snapshot(0, "r", "r", "chatcmpl-r", 0, fired_now=False, final=False, escalated_now=True)
    second = builder.build(up)
    assert _feed(bank, [9.0]).escalated.tolist() == []  # once
    final = builder.build(bank.snapshot(0, "r", "r", "chatcmpl-r", 0, fired_now=False, final=True))
    for e in (first, second, final):
        jsonschema.validate(e, alert_schema())
    d0, d1, d2 = first["data"], second["data"], final["data"]
    assert (d0["tier"], d0["threshold"], d0["action"], d0["revision"]) == ("record", 2.0, "none", 0)
    assert (d1["tier"], d1["threshold"], d1["action"], d1["revision"]) == ("page", 5.0, "abort", 1)
    assert (d2["tier"], d2["revision"], d2["final"]) == ("page", 2, True)
    assert d0["alert_id"] == d1["alert_id"] == d2["alert_id"] and d0["fired_at_position"] == 1


def _metric(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    hits = [s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def test_the_sidecar_records_escalates_and_counts_by_tier(tmp_path):
    """The real sidecar over a real ring: `warm` reaches only the record tier, `hot` records in its prefill and
    escalates in its decode step, `cold` fires nowhere. The decision log, the incidents and /metrics say so."""
    port = free_port()
    cfg = tiny_monitor(tmp_path, {"prometheus": {"port": port}}, tiered=5.0)
    (tmp_path / "det/f.yaml").unlink()  # the tiered detector alone
    doc = yaml.safe_load(cfg.read_text())
    doc["incidents"] = {"enabled": True}
    cfg.write_text(yaml.safe_dump(doc))
    ring = open_ring(tmp_path)
    log, incidents = tmp_path / "decisions.jsonl", tmp_path / "incidents.jsonl"
    service, stop = start_service(cfg, ring, decisions=log, incidents=incidents)

    def publish(req: str, start: int, values: list[float], finished: bool) -> None:
        import torch

        x = torch.zeros(len(values), 16)
        x[:, 0] = torch.tensor(values)
        seg = Segment(req, f"chatcmpl-{req}", req, 0, start, len(values), 3, 0)
        assert ring.publish(1, SlotMeta((seg,), (req,) if finished else (), time.time()), [x])

    deadline = time.time() + 30
    try:
        publish("warm", 0, [0.0, 3.0, 1.0], True)
        publish("cold", 0, [0.0, 1.0, 1.0], True)
        publish("hot", 0, [0.0, 3.0, 1.0], False)
        time.sleep(0.3)
        publish("hot", 3, [8.0], True)
        while not log.exists() or log.read_text().count('"final"') < 3:
            assert time.time() < deadline + 30, "the sidecar did not judge every request"
            time.sleep(0.2)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        while not incidents.exists() or len(incidents.read_text().splitlines()) < 2:
            assert time.time() < deadline + 30, "the incidents were not written"
            time.sleep(0.2)
    finally:
        stop.set()
        service.join(20)
        ring.close()
    events = [(r["request_id"], r["event"], r["tier"]) for r in map(json.loads, log.read_text().splitlines())]
    assert [e for e in events if e[0] == "hot"] == [("hot", "fired", "record"), ("hot", "escalated", "page"),
                                                    ("hot", "final", "page")]
    assert [e for e in events if e[0] == "warm"] == [("warm", "fired", "record"), ("warm", "final", "record")]
    assert [e for e in events if e[0] == "cold"] == [("cold", "final", None)]
    fires = "misalignment_monitor_detector_fires_total"
    assert _metric(text, fires, detector="feat-tiered", tier="record") == 2  # each request once in each tier it reached
    assert _metric(text, fires, detector="feat-tiered", tier="page") == 1
    evaluations = "misalignment_monitor_detector_evaluations_total"
    assert [_metric(text, evaluations, detector="feat-tiered", outcome=o) for o in ("fired", "recorded", "not_fired")] \
        == [1, 1, 1]
    got = {e["data"]["request_id"]: e for e in map(json.loads, incidents.read_text().splitlines())}
    assert set(got) == {"hot", "warm"}
    for e in got.values():
        jsonschema.validate(e, incident_schema())
    assert got["hot"]["data"]["tier"] == "page" and got["warm"]["data"]["tier"] == "record"
    assert got["warm"]["data"]["detectors"][0]["tier"] == "record"


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def test_the_console_shows_and_filters_the_tier(tmp_path, tokenizer):
    """A record-tier incident is listed with a `record` badge, filtered by `tier`, and its page says nobody was
    paged and how often normal conversations reach the record tier (its own calibration), not the page tier."""
    from incident_factory import SPECS

    SPECS["pii-tiered"] = DetectorSpec.model_validate(SPECS["pii-probe"].model_dump() | {
        "name": "pii-tiered", "record_threshold": 0.3, "threshold": 0.999,
        "record_calibration": {"threshold": 0.3, "target_fpr": 0.05, "achieved_fpr": 0.05, "n_benign": 600,
                               "fpr_upper_95": 0.066}})
    try:
        chat = [{"role": "user", "content": "My card is 4111 1111 1111 1111"}]
        corpus = [make_events(tokenizer, chat, "No.", detectors=dets, request_id=rid, when=NOW)
                  for dets, rid in ((("pii-probe",), "paged-1"), (("pii-tiered",), "recorded-1"))]
    finally:
        del SPECS["pii-tiered"]
    alerts, incident = corpus[1]
    assert alerts[0]["data"]["tier"] == "record" and incident["data"]["tier"] == "record"
    site = Site(tmp_path, f"sqlite:///{tmp_path}/incidents.sqlite", corpus)
    c = site.client(site.viewer)
    ids = lambda r: sorted(i["request_id"] for i in r.json()["items"])  # noqa: E731
    assert ids(c.get("/api/incidents")) == ["paged-1", "recorded-1"]
    assert ids(c.get("/api/incidents?tier=record")) == ["recorded-1"]
    assert ids(c.get("/api/incidents?tier=page")) == ["paged-1"]
    assert {i["request_id"]: i["tier"] for i in c.get("/api/incidents").json()["items"]} == {
        "paged-1": "page", "recorded-1": "record"}
    r = c.get("/api/incidents?tier=sometimes")
    assert r.status_code in (400, 422) and "tier" in r.text
    assert 'class="badge-record"' in c.get("/incidents?tier=record").text
    page = c.get(f"/incidents/{incident['data']['alert_ids'][0]}").text
    assert 'id="record-tier"' in page and "record tier · not paged" in page
    assert "About 1 in 20 normal conversations reach this detector&#39;s record tier&#39;s threshold" in page \
        or "About 1 in 20 normal conversations reach this detector's record tier's threshold" in page
    assert 'id="record-tier"' not in c.get(f"/incidents/{corpus[0][1]['data']['alert_ids'][0]}").text
    # Where a page lands: the page-tier incidents behind MisalignmentDetectorFired, not the recorded ones.
    since = "2000-01-01T00:00:00Z"
    assert 'id="alert-incident-0"' not in c.get(f"/alert?detector=pii-tiered&since={since}").text
    assert 'id="alert-incident-0"' in c.get(f"/alert?detector=pii-tiered&since={since}&tier=record").text
    assert 'id="alert-incident-0"' in c.get(f"/alert?detector=pii-probe&since={since}").text
