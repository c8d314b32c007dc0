"""`enforcement.fail_closed` with the real vLLM on CPU: no sidecar, no generation.

Its own (eager) vLLM server, started after test_enforcement.py's has stopped: the API server reads
`enforcement` once, at start. Without a sidecar, requests are refused (503); with one, served; when
it is killed mid-stream, the stream is aborted and new requests are refused again.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

from capture_helpers import capture_config
from monitor.stack.vllm_server import VLLMServer
from test_enforcement import start_sidecar, stream_result

pytestmark = pytest.mark.vllm


def post(server: VLLMServer, stream: bool = False, max_tokens: int = 8) -> tuple[int, str, dict]:
    body = {"model": server.served_name, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": max_tokens, "temperature": 0.0, "stream": stream, "ignore_eos": True}
    if stream:
        body["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(f"{server.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read().decode(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), {k.lower(): v for k, v in e.headers.items()}


def test_fail_closed_refuses_without_the_sidecar_and_aborts_when_it_dies(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("closed")
    config = capture_config(folder / "rings", detectors=True)
    doc = yaml.safe_load(config.read_text())
    doc["enforcement"] = {"fail_closed": True, "heartbeat_s": 0.5, "sidecar_timeout_s": 2.0}
    config.write_text(yaml.safe_dump(doc))
    with VLLMServer(model_dir, monitor_config=config, eager=True, log_path=folder / "vllm.log") as server:
        status, body, headers = post(server)
        assert status == 503 and headers["retry-after"] == "5" and "fail_closed" in body, (status, body)
        side = start_sidecar(config, folder)
        try:
            deadline = time.time() + 180
            while (status := post(server)[0]) == 503:  # until the sidecar's first heartbeat reaches vLLM
                assert side.poll() is None, (folder / "sidecar.log").read_text()[-3000:]
                assert time.time() < deadline, "never served with the sidecar up"
                time.sleep(0.5)
            assert status == 200
            result = {}
            reader = threading.Thread(target=lambda: result.update(zip(("status", "raw", "headers"),
                                                                       post(server, stream=True, max_tokens=400))))
            reader.start()
            time.sleep(3)  # the stream is under way
            side.send_signal(signal.SIGKILL)
            side.wait(timeout=30)
            killed = time.monotonic()
            reader.join(timeout=120)
        finally:
            if side.poll() is None:
                side.kill()
        s = stream_result(result["raw"])
        assert result["status"] == 200 and s["finish_reason"] == "abort", s
        assert s["stop_reason"] == "misalignment-monitor: sidecar unavailable" and 0 < s["tokens"] < 400
        assert time.monotonic() - killed < 60
        status, body, _ = post(server)
        assert status == 503 and "fail_closed" in body
