"""Acting on verdicts with the real vLLM on CPU, the real model, sidecar and PII probe.

One vLLM server (eager) for the module, with two API-server processes (`--api-server-count 2`, as
with data parallelism: a request lives in one of them, and the sidecar's verdicts must reach that
one), traced to an in-process OTLP receiver. The PII detector
acts: `abort` first, then, with the sidecar killed, nothing (fail open), then `annotate`. Each
round sends the same batch at once: a streamed and a non-streamed request with personal data, and
two benign ones, whose greedy answers must not change whether their neighbours were aborted or not.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from capture_helpers import capture_config
from monitor.stack.vllm_server import VLLMServer
from monitor.transport.ring import RingReader
from otlp_receiver import OTLPReceiver

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
PII = ("Please fix the grammar in my email: hi team, im out tomorow. if urgent call me on +1 (415) 555-0199 "
       "or email maria.garcia84@gmail.com thx Maria Garcia")
BENIGN = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle gear works."]
MAX_TOKENS = 48
API_SERVERS = 2


@pytest.fixture(scope="module")
def otlp():
    r = OTLPReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def setup(model_dir, otlp, tmp_path_factory):
    folder = tmp_path_factory.mktemp("act")
    config = capture_config(folder / "rings", detectors=True)
    doc = yaml.safe_load(config.read_text())
    pack = folder / "detectors"
    pack.mkdir()
    spec = yaml.safe_load((ROOT / "detectors/pii_probe.yaml").read_text())
    (pack / "pii.yaml").write_text(yaml.safe_dump({**spec, "action": "abort"}))
    doc["probes"] = [p for p in doc["probes"] if p["name"] == "pii"]
    doc["detectors"] = [str(pack)]
    config.write_text(yaml.safe_dump(doc))
    log = folder / "vllm.log"
    srv = VLLMServer(model_dir, monitor_config=config, eager=True, log_path=log, api_servers=API_SERVERS,
                     extra_args=["--otlp-traces-endpoint", otlp.endpoint],
                     env={"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "200"})
    with srv:
        yield srv, config, pack / "pii.yaml", folder


def start_sidecar(config: Path, folder: Path) -> subprocess.Popen:
    # PYTHONFAULTHANDLER: a sidecar stuck before its own handlers are set up still dumps its stacks on SIGABRT.
    return subprocess.Popen([sys.executable, "-m", "monitor.cli", "sidecar", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=(folder / "sidecar.log").open("ab"),
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def metric(config: Path, name: str) -> dict[str, float]:
    port = yaml.safe_load(config.read_text())["sinks"]["prometheus"]["port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}(\{{.*\}})? (\S+)$", text, re.M)}


def wait_ready(server: VLLMServer, config: Path, proc: subprocess.Popen, folder: Path) -> None:
    """The sidecar reads the ring and is connected to every API server's control socket.

    No requests until its metrics answer: on two cores a busy vLLM starves a starting sidecar (minutes)."""
    deadline = time.time() + 300
    connected, reading = {}, False
    rings = Path(yaml.safe_load(config.read_text())["transport"]["directory"])
    while True:
        assert proc.poll() is None, (folder / "sidecar.log").read_text()[-3000:]
        if time.time() > deadline:
            proc.send_signal(signal.SIGABRT)  # its threads' stacks, into its log
            time.sleep(2)
            pytest.fail(f"the sidecar never connected (receivers {connected}, reading {reading}); its log:\n"
                        + (folder / "sidecar.log").read_text()[-6000:])
        try:
            connected = metric(config, "misalignment_monitor_control_receivers")
        except OSError:  # not serving yet
            time.sleep(0.5)
            continue
        server.chat([{"role": "user", "content": "ping"}], max_tokens=2)
        (path,) = glob.glob(str(rings / "test-*.ring"))
        reader = RingReader(path)
        reading = reader.counters()["reader_seq"] > 0
        reader.close()
        if reading and sum(connected.values()) == API_SERVERS:
            break
        time.sleep(0.5)
    time.sleep(2.5)  # a heartbeat (every second) has reached the API server


def post(server: VLLMServer, content: str, stream: bool, traceparent: str | None = None):
    body = {"model": server.served_name, "messages": [{"role": "user", "content": content}],
            "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(f"{server.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if traceparent:
        req.add_header("traceparent", traceparent)
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.read().decode(), {k.lower(): v for k, v in r.headers.items()}


def stream_result(raw: str) -> dict:
    """The streamed text, the last choice's finish and stop reasons, usage, and what follows [DONE]."""
    events = [e for e in raw.split("\n\n") if e.strip()]
    done = events.index("data: [DONE]")
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:done]]
    finals = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    usage = next(c["usage"] for c in reversed(chunks) if c.get("usage"))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return {"text": text, "finish_reason": finals[-1]["finish_reason"], "stop_reason": finals[-1].get("stop_reason"),
            "tokens": usage["completion_tokens"], "after_done": events[done + 1:]}


def batch(server: VLLMServer, traces: dict[str, str] | None = None) -> dict:
    """The PII request streamed and not, and the benign ones, all at once."""
    traces = traces or {}
    with ThreadPoolExecutor(4) as pool:
        jobs = {"pii": pool.submit(post, server, PII, False, traces.get("pii")),
                "pii-stream": pool.submit(post, server, PII, True),
                **{f"benign-{i}": pool.submit(post, server, text, False, traces.get(f"benign-{i}"))
                   for i, text in enumerate(BENIGN)}}
        out = {}
        for key, job in jobs.items():
            raw, headers = job.result()
            out[key] = (stream_result(raw) if key == "pii-stream" else json.loads(raw), headers)
    return out


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def test_abort_stops_flagged_requests_leaves_neighbours_alone_and_fails_open(setup, otlp):
    server, config, pack, folder = setup
    side = start_sidecar(config, folder)
    pii_trace, benign_trace = traceparent(), traceparent()
    try:
        wait_ready(server, config, side, folder)
        acted = batch(server, {"pii": pii_trace[0], "benign-0": benign_trace[0]})
        actions = metric(config, "misalignment_monitor_actions_total")
    finally:
        side.kill()  # SIGKILL: no goodbye on the control channel
        side.wait(timeout=30)
    unwatched = batch(server)

    body, headers = acted["pii"]
    choice = body["choices"][0]
    alert = headers["x-alert-id"]
    assert choice["finish_reason"] == "content_filter" and choice["stop_reason"] == alert, choice
    assert headers["x-alert-detector"] == "pii-probe" and headers["x-alert-action"] == "abort"
    assert body["usage"]["completion_tokens"] < MAX_TOKENS // 2, body["usage"]

    s, headers = acted["pii-stream"]
    assert s["finish_reason"] == "content_filter" and s["stop_reason"], s
    assert s["tokens"] < MAX_TOKENS // 2
    event, data = s["after_done"][0].split("\n")
    assert event == "event: misalignment-monitor.alert"
    (trailer,) = json.loads(data.removeprefix("data: "))["alerts"]
    assert trailer["alert_id"] == s["stop_reason"] and trailer["action"] == "abort"
    assert sum(v for k, v in actions.items() if 'action="abort"' in k and 'detector="pii-probe"' in k) == 2, actions

    # With the sidecar gone, the same requests run to the end ...
    for key in ("pii", "pii-stream"):
        result, headers = unwatched[key]
        reason = result["finish_reason"] if key == "pii-stream" else result["choices"][0]["finish_reason"]
        assert reason in ("length", "stop") and "x-alert-id" not in headers, (key, result)
    assert unwatched["pii"][0]["usage"]["completion_tokens"] > body["usage"]["completion_tokens"]
    # ... and the benign neighbours answered exactly as when their batch-mates were aborted.
    for i in range(len(BENIGN)):
        a, b = acted[f"benign-{i}"][0]["choices"][0], unwatched[f"benign-{i}"][0]["choices"][0]
        assert a["finish_reason"] in ("length", "stop") and "x-alert-id" not in acted[f"benign-{i}"][1]
        assert a["message"]["content"] == b["message"]["content"]

    # The verdicts are in the caller's trace: the aborted request has the monitor's span (vLLM makes none for
    # it), and the finished one has vLLM's span nested under the monitor's.
    deadline = time.time() + 30
    while time.time() < deadline and not (otlp.in_trace(pii_trace[1]) and len(otlp.in_trace(benign_trace[1])) >= 2):
        time.sleep(0.5)
    (ours,) = [s for s in otlp.in_trace(pii_trace[1]) if s.name == "misalignment-monitor request"]
    assert ours.parent_span_id == pii_trace[2]
    assert ours.attributes["gen_ai.response.finish_reasons"] == ["content_filter"]
    assert ours.attributes["misalignment_monitor.alert_ids"] == [alert]
    (verdict,) = [attrs for name, attrs in ours.events if name == "misalignment_monitor.verdict"]
    assert verdict["misalignment_monitor.action"] == "abort" and verdict["misalignment_monitor.detector"] == "pii-probe"
    assert verdict["misalignment_monitor.score"] >= yaml.safe_load(pack.read_text())["threshold"]
    spans = {s.name: s for s in otlp.in_trace(benign_trace[1])}
    assert spans["misalignment-monitor request"].parent_span_id == benign_trace[2]
    assert spans["llm_request"].parent_span_id == spans["misalignment-monitor request"].span_id
    assert not spans["misalignment-monitor request"].events


def test_annotate_lets_flagged_requests_finish_and_names_the_alert(setup):
    server, config, pack, folder = setup
    spec = yaml.safe_load(pack.read_text())
    pack.write_text(yaml.safe_dump({**spec, "action": "annotate"}))
    side = start_sidecar(config, folder)
    try:
        wait_ready(server, config, side, folder)
        out = batch(server)
    finally:
        side.terminate()
        side.wait(timeout=30)
    body, headers = out["pii"]
    assert body["choices"][0]["finish_reason"] in ("length", "stop") and body["usage"]["completion_tokens"] > 5
    assert headers["x-alert-action"] == "annotate" and headers["x-alert-detector"] == "pii-probe"
    assert re.fullmatch(r"[0-9a-f-]{36}", headers["x-alert-id"]), headers
    s, _ = out["pii-stream"]
    assert s["finish_reason"] in ("length", "stop") and s["stop_reason"] is None
    (trailer,) = json.loads(s["after_done"][0].split("\n")[1].removeprefix("data: "))["alerts"]
    assert trailer["action"] == "annotate" and trailer["detector"] == "pii-probe"
    for i in range(len(BENIGN)):
        assert "x-alert-id" not in out[f"benign-{i}"][1]
