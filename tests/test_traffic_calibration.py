"""`monitor calibrate --from-decisions`: a threshold set on the deployment's own recorded traffic, with a
person's verdicts from the incident store as labels."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import yaml

from incident_factory import make_events
from monitor.cli import main
from monitor.store.db import Store
from sidecar_helpers import tiny_monitor

TARGET = 0.02
T0 = time.time() - 2 * 86400  # the requests ran two days ago


@pytest.fixture()
def traffic(tmp_path, model_dir):
    """A tiny monitor whose `feat` detector ran in shadow on 400 requests (scores ~ |N(0, 2)|, three of them
    far above: a confirmed attack at 100, a false positive at 40, one never judged at 30), and a store
    holding the incidents of the three with their verdicts."""
    from transformers import AutoTokenizer

    cfg = tiny_monitor(tmp_path, {})
    doc = yaml.safe_load(cfg.read_text())
    doc["store"] = {"sqlite_path": str(tmp_path / "incidents.sqlite")}
    cfg.write_text(yaml.safe_dump(doc))
    det = tmp_path / "det/f.yaml"
    det.write_text(yaml.safe_dump(yaml.safe_load(det.read_text()) | {"mode": "shadow"}))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    store = Store(f"sqlite:///{tmp_path}/incidents.sqlite")
    rng = np.random.default_rng(7)
    scores = list(np.abs(rng.normal(0, 2, 397)))
    special = {"attack": (100.0, "true_positive"), "order-number": (40.0, "false_positive"), "unjudged": (30.0, None)}
    records = [{"event": "final", "time": T0 + k, "request_id": f"r{k}", "detector": "feat", "mode": "shadow",
                "score": float(s), "threshold": 5.0, "fired": bool(s >= 5), "alert_id": None} for k, s in enumerate(scores)]
    with store.session() as s:
        for name, (score, _) in special.items():
            alerts, incident = make_events(tok, [{"role": "user", "content": f"{name} 555 0134"}], "ok", request_id=name)
            store.add_incident(s, incident)
            records.append({"event": "final", "time": T0 + 500, "request_id": name, "detector": "feat",
                            "mode": "shadow", "score": score, "threshold": 5.0, "fired": True,
                            "alert_id": incident["data"]["alert_ids"][0]})
        s.commit()
    for name, (_, verdict) in special.items():
        if verdict:
            alert = next(r["alert_id"] for r in records if r["request_id"] == name)
            store.triage(alert, "tom", "verdict", verdict, "judged in the console")
    log = tmp_path / "decisions.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    return cfg, det, log, records


def calibrate(capsys, cfg, det, *argv):
    code = main(["calibrate", "--config", str(cfg), "--detectors", str(det.parent), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_threshold_fires_on_the_target_share_of_the_traffic(traffic, capsys):
    cfg, det, log, records = traffic
    code, out, err = calibrate(capsys, cfg, det, "--from-decisions", str(log), "--target-fpr", str(TARGET))
    assert code == 0, err
    spec = yaml.safe_load(det.read_text())
    thr = spec["threshold"]
    # The confirmed attack is not normal traffic: 399 requests count; at most 2% of them reach the threshold.
    counted = [r["score"] for r in records if r["request_id"] != "attack"]
    fires = sum(s >= thr for s in counted)
    assert len(counted) == 399 and fires == math.floor(TARGET * 399)
    assert sum(s >= np.nextafter(thr, -np.inf) for s in counted) >= fires  # the lowest such threshold
    cal = spec["calibration"]
    assert cal["source"] == "traffic" and cal["n_benign"] == 399 and cal["target_fpr"] == TARGET
    assert cal["labels"] == {"true_positive": 1, "false_positive": 1, "none": 398}
    assert abs(cal["achieved_fpr"] - fires / 399) < 1e-12 and cal["baseline"]["n_requests"] == 399
    assert spec["mode"] == "shadow"  # calibrating does not make it live: that is a person's decision
    assert "399 requests of your traffic" in out and "true positive 1" in out
    # Without the verdicts the attack counts as traffic.
    code, out, _ = calibrate(capsys, cfg, det, "--from-decisions", str(log), "--target-fpr", str(TARGET),
                             "--no-labels", "--dry-run")
    assert code == 0 and "400 requests" in out


def test_a_log_the_sidecar_is_writing_is_read_to_its_last_whole_line(traffic, capsys):
    """Calibrating on the live log: the record being written (no newline yet) is left for the next read."""
    cfg, det, log, _ = traffic
    log.write_text(log.read_text() + '{"event": "final", "time": 1, "request_id": "r-half", "detec')
    code, out, err = calibrate(capsys, cfg, det, "--from-decisions", str(log), "--target-fpr", str(TARGET))
    assert code == 0, err
    assert yaml.safe_load(det.read_text())["calibration"]["n_benign"] == 399


def test_too_few_requests_say_how_many_are_needed(traffic, capsys):
    cfg, det, log, _ = traffic
    before = det.read_text()
    code, _, err = calibrate(capsys, cfg, det, "--from-decisions", str(log), "--target-fpr", "0.001")
    assert code == 2 and "399 request(s) in the decision log cannot show a fire rate of 0.001" in err
    assert "at least 3000 are needed" in err and det.read_text() == before
    code, _, err = calibrate(capsys, cfg, det, "--from-decisions", str(log), "--target-fpr", str(TARGET),
                             "--since", "1h")
    assert code == 2 and "0 request(s) in the decision log since" in err
    code, _, err = calibrate(capsys, cfg, det, "--from-decisions", str(log), "--target-fpr", str(TARGET),
                             "--since", "last week")
    assert code == 2 and "'last week' is not a time" in err
    bad = log.parent / "bad.jsonl"
    bad.write_text('{"event": "final"}\n')
    code, _, err = calibrate(capsys, cfg, det, "--from-decisions", str(bad), "--target-fpr", str(TARGET))
    assert code == 2 and "bad.jsonl:1: not a decision record" in err
    code, _, err = calibrate(capsys, cfg, det, "--target-fpr", str(TARGET))
    assert code == 2 and "--benign FILE" in err and "--from-decisions" in err


def test_calibrate_on_what_a_real_sidecar_recorded_in_shadow(tmp_path, capsys):
    """The sidecar loop over a real ring writes its decision log with a detector in shadow; the threshold
    calibrated on it fires on the target share of those very requests."""
    from sidecar_helpers import open_ring, publish_request, start_service

    cfg = tiny_monitor(tmp_path, {})
    det = tmp_path / "det/f.yaml"
    det.write_text(yaml.safe_dump(yaml.safe_load(det.read_text()) | {"mode": "shadow"}))
    log = tmp_path / "decisions.jsonl"
    ring = open_ring(tmp_path)
    service, stop = start_service(cfg, ring, decisions=log)
    rng = np.random.default_rng(3)
    maxima = rng.gamma(2.0, 2.0, 160)  # each request's feature maximum: its detector score
    deadline = time.time() + 30
    try:
        for k, m in enumerate(maxima):
            publish_request(ring, [0.0, float(m), 0.5 * float(m)], req=f"t{k}")
            time.sleep(0.02)  # a producer at traffic speed: the ring never fills
        while sum(1 for line in log.read_text().splitlines() if '"final"' in line) < 160:
            assert time.time() < deadline + 60, "the sidecar did not record every request"
            time.sleep(0.2)
    finally:
        stop.set()
        service.join(timeout=20)
        ring.close()
    finals = [json.loads(line) for line in log.read_text().splitlines() if json.loads(line)["event"] == "final"]
    assert all(r["mode"] == "shadow" for r in finals)
    assert sorted(r["score"] for r in finals) == pytest.approx(sorted(float(m) for m in maxima), rel=1e-5)
    code = main(["calibrate", "--config", str(cfg), "--detectors", str(det.parent), "--from-decisions", str(log),
                 "--target-fpr", str(TARGET), "--no-labels"])
    assert code == 0, capsys.readouterr().err
    thr = yaml.safe_load(det.read_text())["threshold"]
    assert sum(r["score"] >= thr for r in finals) == math.floor(TARGET * 160)


def test_a_record_tier_from_the_same_traffic_and_kept_at_its_rate(traffic, capsys):
    """`--record-fpr` sets the record tier from the same requests; a later calibration without the flag keeps
    that tier at its own rate; a record threshold set by hand that the new threshold would pass is refused."""
    cfg, det, log, records = traffic
    code, out, err = calibrate(capsys, cfg, det, "--from-decisions", str(log), "--target-fpr", str(TARGET),
                               "--record-fpr", "0.1")
    assert code == 0, err
    spec = yaml.safe_load(det.read_text())
    counted = [r["score"] for r in records if r["request_id"] != "attack"]
    rec = spec["record_calibration"]
    assert spec["record_threshold"] == rec["threshold"] < spec["threshold"]
    assert sum(s >= spec["record_threshold"] for s in counted) == math.floor(0.1 * 399)
    assert rec["source"] == "traffic" and rec["target_fpr"] == 0.1 and rec["n_benign"] == 399
    assert "record tier" in out
    code, _, err = calibrate(capsys, cfg, det, "--from-decisions", str(log), "--target-fpr", "0.05")
    assert code == 0, err
    again = yaml.safe_load(det.read_text())
    assert again["record_calibration"]["target_fpr"] == 0.1 and again["record_threshold"] == spec["record_threshold"]
    hand = {k: v for k, v in again.items() if k != "record_calibration"} | {"record_threshold": 1e6, "threshold": 2e6}
    det.write_text(yaml.safe_dump(hand))
    code, _, err = calibrate(capsys, cfg, det, "--from-decisions", str(log), "--target-fpr", str(TARGET))
    assert code == 2 and "record_threshold 1e+06 (set by hand) would not be below the new threshold" in err
    assert yaml.safe_load(det.read_text()) == hand  # nothing written
