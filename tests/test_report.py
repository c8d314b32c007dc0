"""`monitor report`: the audit report of the shipped detectors (evaluated, printed to PDF, seen in Chromium),
and its production figures read from a real Prometheus scraping a real sidecar."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from binaries import binary
from monitor.stack.alerting import Prometheus
from monitor.stack.vllm_server import free_port
from sidecar_helpers import open_ring, publish_request, start_service, tiny_monitor

ROOT = Path(__file__).resolve().parents[1]


def report_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor.cli", "report", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def families(tmp_path: Path) -> list[Path]:
    """Two families from the committed test splits: single requests, and multi-turn conversations."""
    out = {"single-turn": [], "multi-turn": []}
    for concept in ("pii", "prompt_injection", "harmful_request"):
        recs = [json.loads(line) for line in (ROOT / f"data/concepts/{concept}/test.jsonl").read_text().splitlines()]
        for fam in out:
            multi = fam == "multi-turn"
            pick = [r for r in recs if (sum(m["role"] == "user" for m in r["messages"]) > 1) == multi]
            out[fam] += [r for r in pick if r["labels"][concept]][:8] + [r for r in pick if not r["labels"][concept]][:12]
    files = []
    for fam, recs in out.items():
        files.append(tmp_path / f"{fam}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return files


def test_report_of_the_shipped_detectors(tmp_path):
    """Definitions, training data, calibration, evaluation by family with plots, limits; a PDF; its look in
    Chromium (docs/images/report.png comes from here)."""
    from playwright.sync_api import sync_playwright

    out = tmp_path / "report"
    res = report_cli("--out", str(out), "--data", *map(str, families(tmp_path)))
    assert res.returncode == 0, res.stderr[-3000:]
    html = (out / "index.html").read_text()
    detectors = sorted(p.stem for p in (ROOT / "detectors").glob("*.yaml"))
    packs = {yaml.safe_load((ROOT / "detectors" / f"{d}.yaml").read_text())["name"]: d for d in detectors}
    for name in packs:
        assert f'id="{name}"' in html, name
    assert "smollm2-135m-instruct" in html and "Layers tapped" in html
    probe = yaml.safe_load((ROOT / "detectors/pii_probe.yaml").read_text())
    training = json.loads((ROOT / "artifacts/demo/probes/pii/probe.json").read_text())["training"]
    assert training["sha256"][:16] in html and str(probe["calibration"]["n_benign"]) in html
    assert "single-turn" in html and "multi-turn" in html and "(weakest: <b>" in html
    assert html.count('src="data:image/png;base64,') == len(packs)  # one ROC + histogram figure each, inlined
    assert "Known limits" in html and "src=\"http" not in html  # self-contained: nothing fetched
    pdf = out / "report.pdf"
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 20_000, res.stderr[-2000:]
    shots = ROOT / "docs" / "images"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary("chromium"), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 1500})
        try:
            page.goto((out / "index.html").as_uri())
            rows = page.locator("main > table").first.locator("tr")
            assert rows.count() == len(packs) + 1
            img = page.locator("figure img").first
            assert img.evaluate("i => i.complete && i.naturalWidth > 500")  # the inlined plot decodes
            page.screenshot(path=str(shots / "report.png"))
            page.locator(f"#{list(packs)[0]} figure").screenshot(path=str(shots / "report-evaluation.png"))
        finally:
            browser.close()


def test_report_reads_firing_and_drift_from_prometheus(tmp_path):
    """A sidecar whose traffic scores far above its calibration baseline: Prometheus scrapes its drift and
    fires, and the report states them over the window. The detector starts in shadow and goes live by a
    config reload halfway: the report says when."""
    binary("prometheus")
    port = free_port()
    cfg = tiny_monitor(tmp_path, {"prometheus": {"port": port}})
    doc = yaml.safe_load(cfg.read_text())
    doc["drift"] = {"window_requests": 20, "min_requests": 10, "window_tokens": 100}
    cfg.write_text(yaml.safe_dump(doc))
    det = tmp_path / "det/f.yaml"
    spec = yaml.safe_load(det.read_text())
    spec["calibration"] = {"threshold": 5.0, "target_fpr": 0.01, "achieved_fpr": 0.008, "n_benign": 1000,
                           "data": "benign.jsonl", "baseline": {
                               "score_edges": [1.0, 2.0], "score_fractions": [0.8, 0.15, 0.05],
                               "input_rates": {"s/3": 0.1}, "n_requests": 1000, "n_tokens": 5000}}
    det.write_text(yaml.safe_dump({**spec, "mode": "shadow"}))
    ring = open_ring(tmp_path)
    thread, stop = start_service(cfg, ring)
    try:
        prom = Prometheus(tmp_path / "prom").start({
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "misalignment-monitor", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]})
        with prom:
            deadline = time.time() + 30
            while not prom.query('misalignment_monitor_detector_fires_total{detector="feat"}'):
                assert time.time() < deadline, "Prometheus never scraped the sidecar"
                time.sleep(0.5)
            for i in range(12):  # final scores 3..14: all above the baseline's top bin; 10 of them fire (>= 5)
                if i == 6:  # watched enough: live, by a reload (the sidecar re-reads its config's files)
                    while not prom.query('misalignment_monitor_detector_fires_total{detector="feat", mode="shadow"} > 0'):
                        assert time.time() < deadline + 30, "the shadow fires never reached Prometheus"
                        time.sleep(0.5)
                    det.write_text(yaml.safe_dump(spec))
                    while not prom.query('misalignment_monitor_detector_fires_total{detector="feat", mode="live"}'):
                        assert time.time() < deadline + 60, "the reload to live never reached Prometheus"
                        time.sleep(0.5)
                publish_request(ring, [0.0, 3.0 + i, 1.0], req=f"r{i}")
            while not prom.query("misalignment_monitor_detector_score_psi > 1"):
                assert time.time() < deadline + 30, "no drift figure reached Prometheus"
                time.sleep(0.5)
            time.sleep(2)  # one more scrape: the last fires counted too
            psi = float(prom.query('misalignment_monitor_detector_score_psi{detector="feat"}')[0]["value"][1])
            out = tmp_path / "report"
            res = report_cli("--config", str(cfg), "--out", str(out), "--prometheus", prom.url, "--window", "5m",
                             "--no-pdf", timeout=120)
            assert res.returncode == 0, res.stderr[-3000:]
    finally:
        stop.set()
        thread.join(timeout=10)
    html = (out / "index.html").read_text()
    assert f"now {psi:.3f}" in html
    fires = re.search(r"<dt>Fires</dt><dd>(\d+) of (\d+) requests judged", html)
    assert fires is not None, html[-3000:]
    assert 9 <= int(fires.group(1)) <= 12 and 11 <= int(fires.group(2)) <= 15  # increase() extrapolates a little
    assert "calibration: 10.00%" in html  # the input's baseline firing rate beside the window's
    assert re.search(r"<dt>Mode</dt><dd>live: [^<]*; went live at \d{4}-\d\d-\d\d \d\d:\d\d UTC", html), html
    assert not (out / "report.pdf").exists()


def test_report_names_what_is_wrong(tmp_path):
    res = report_cli("--out", str(tmp_path / "r"), "--window", "a week", "--no-pdf", timeout=120)
    assert res.returncode == 2 and "--window 'a week' is not a Prometheus duration" in res.stderr
    res = report_cli("--out", str(tmp_path / "r"), "--prometheus", f"http://127.0.0.1:{free_port()}", "--no-pdf",
                     timeout=120)
    assert res.returncode == 2 and "cannot reach Prometheus at http://127.0.0.1:" in res.stderr
