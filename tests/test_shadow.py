"""Shadow mode: a detector watched on real traffic before it is trusted. It scores, counts and records
incidents (marked shadow, listed apart), but never acts and never pages (the paging rules are checked
through Prometheus and Alertmanager in test_alerting_config.py)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from incident_factory import SPECS, make_events
from monitor.config import ConfigError, load_config
from monitor.sinks.control import acting
from monitor.sinks.events import alert_schema
from monitor.sinks.incidents import incident_schema
from test_console import NOW, Site

CHAT = [{"role": "user", "content": "My card is 4111 1111 1111 1111"}]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def test_a_shadow_detector_never_acts_and_says_so_in_its_events(tokenizer):
    alerts, incident = make_events(tokenizer, CHAT, "No.", detectors=("pii-shadow",), request_id="shadow-1")
    assert SPECS["pii-shadow"].action == "abort"  # what it would do once live
    assert acting([SPECS["pii-shadow"]]) == ()  # no API server is told to wait for its verdicts
    assert acting([SPECS["pii-shadow"], SPECS["pii-probe"]]) == ()
    (alert,) = alerts
    assert alert["data"]["mode"] == "shadow" and alert["data"]["action"] == "none"
    jsonschema.validate(alert, alert_schema())
    assert incident["data"]["mode"] == "shadow"
    jsonschema.validate(incident, incident_schema())
    # A live detector firing on the same request makes it a live incident: someone was paged for it.
    _, mixed = make_events(tokenizer, CHAT, "No.", detectors=("pii-probe", "pii-shadow"), request_id="mixed-1")
    assert mixed["data"]["mode"] == "live"
    assert {d["name"]: d["definition"]["mode"] for d in mixed["data"]["detectors"]} == {
        "pii-probe": "live", "pii-shadow": "shadow"}


def test_an_unknown_mode_is_refused_naming_the_field(tmp_path):
    (tmp_path / "det").mkdir()
    (tmp_path / "det/d.yaml").write_text(json.dumps({
        "name": "d", "concept": "c", "inputs": [{"probe": "p"}], "aggregation": {"kind": "max"}, "threshold": 0.5,
        "mode": "quiet"}))
    (tmp_path / "m.yaml").write_text(json.dumps({"model": {"name": "m", "num_layers": 2, "d_model": 4},
                                                 "detectors": ["det"]}))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "m.yaml")
    assert "mode" in str(e.value) and "d.yaml" in str(e.value)


@pytest.fixture()
def shadow_site(tmp_path, tokenizer):
    corpus = [make_events(tokenizer, CHAT, "No.", detectors=dets, request_id=rid, when=when)
              for dets, rid, when in ((("pii-probe",), "live-1", NOW), (("pii-shadow",), "shadow-1", NOW),
                                      (("pii-probe", "pii-shadow"), "mixed-1", NOW))]
    return Site(tmp_path, f"sqlite:///{tmp_path}/incidents.sqlite", corpus), corpus


def test_the_console_lists_shadow_incidents_apart(shadow_site):
    site, corpus = shadow_site
    c = site.client(site.viewer)
    ids = lambda items: sorted(i["request_id"] for i in items)  # noqa: E731
    assert ids(c.get("/api/incidents").json()["items"]) == ["live-1", "mixed-1"]  # what the on-call sees
    shadow = c.get("/api/incidents?mode=shadow").json()
    assert ids(shadow["items"]) == ["shadow-1"] and shadow["items"][0]["mode"] == "shadow"
    assert shadow["counts"] == {"pii-shadow": 1}
    assert ids(c.get("/api/incidents?mode=all").json()["items"]) == ["live-1", "mixed-1", "shadow-1"]
    # Filtered by the shadow detector, the on-call list has the incident a live detector also fired on.
    assert ids(c.get("/api/incidents?detector=pii-shadow").json()["items"]) == ["mixed-1"]
    r = c.get("/api/incidents?mode=sometimes")
    assert r.status_code in (400, 422) and "mode" in r.text
    page = c.get("/incidents?mode=shadow").text
    assert "Shadow incidents" in page and "shadow-1" in page and "live-1" not in page
    assert re.search(r'<a href="/incidents\?mode=shadow" id="tab-shadow" class="on">', page)
    assert "shadow-1" not in c.get("/incidents").text
    # Its page says it was never paged; a live incident's does not.
    shadow_alert = corpus[1][1]["data"]["alert_ids"][0]
    assert 'id="shadow"' in c.get(f"/incidents/{shadow_alert}").text
    assert 'id="shadow"' not in c.get(f"/incidents/{corpus[0][1]['data']['alert_ids'][0]}").text
