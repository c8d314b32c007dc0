"""The sidecar's HTTP endpoint under abuse: idle connections cannot make it start a thread each, and it
exports no thresholds unless asked."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from monitor.sinks.metrics import BACKLOG, WORKERS
from monitor.stack.vllm_server import free_port
from sidecar_helpers import open_ring, start_service, tiny_monitor


def test_idle_connections_are_bounded_and_the_endpoint_recovers(tmp_path):
    port = free_port()
    cfg = tiny_monitor(tmp_path, {"prometheus": {"port": port}})
    ring = open_ring(tmp_path)
    service, stop = start_service(cfg, ring)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "misalignment_monitor_detector_threshold" not in text  # off by default
    assert "misalignment_monitor_detector_evaluations_total" in text
    before = threading.active_count()
    idle = []
    for _ in range(300):  # connect, send nothing: a slowloris, or a scanner
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        idle.append(s)
    time.sleep(1.0)
    during = threading.active_count()
    for s in idle:
        s.close()
    # The pool's threads (at most WORKERS) are all it started; the rest waited (at most BACKLOG) or were shut.
    assert during - before <= WORKERS, (before, during)
    deadline = time.time() + 30
    while True:  # workers freed as the closed sockets are read (EOF) or time out
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).read()
            break
        except OSError:
            assert time.time() < deadline, "the endpoint never recovered"
            time.sleep(0.5)
    assert b'"status": "ok"' in body
    assert threading.active_count() - before <= WORKERS
    stop.set()
    service.join(timeout=20)
    ring.close()
    assert BACKLOG < 300  # the case above overflowed the wait list
