"""Fail-open: whatever the sidecar does, vLLM answers every request exactly as without the plugin.

Two servers, one after the other (never two at once): the kill switch (the plugin stands aside
entirely) gives the reference outputs; then the plugin taps with, in turn, no sidecar, a sidecar
paused with SIGSTOP, and that sidecar killed. Requests go one at a time so batches, and so greedy
outputs, are comparable.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capture_helpers import capture_config
from monitor.stack.vllm_server import VLLMServer
from monitor.transport.ring import RingReader

pytestmark = pytest.mark.vllm

PROMPTS = ["What is the capital of France?", "Write a haiku about snow.", "Name three primary colors.",
           "What is 12 times 12?", "Give one tip for better sleep."]


def answers(server: VLLMServer) -> list[str]:
    return [server.chat([{"role": "user", "content": p}], max_tokens=24)[0]["choices"][0]["message"]["content"]
            for p in PROMPTS]


def ring_counters(folder: Path) -> dict[str, int]:
    (path,) = glob.glob(str(folder / "test-*.ring"))
    r = RingReader(path)
    try:
        c = r.counters()
    finally:
        r.close()
    return c


def test_plugin_never_changes_what_vllm_answers(model_dir, tmp_path):
    rings = tmp_path / "rings"
    # Few slots so that a missing or paused reader fills the ring within a handful of requests.
    cfg = capture_config(rings, detectors=True, slots=8)

    with VLLMServer(model_dir, monitor_config=cfg, plugin_disabled=True, log_path=tmp_path / "off.log") as off:
        reference = answers(off)
    assert not glob.glob(str(rings / "test-*.ring")), "the kill switch must leave vLLM untouched: no ring"

    with VLLMServer(model_dir, monitor_config=cfg, log_path=tmp_path / "on.log") as on:
        # 1. No sidecar at all.
        assert answers(on) == reference
        dropped_without_sidecar = ring_counters(rings)["dropped_slots"]
        assert dropped_without_sidecar > 0, "with nobody reading, the full ring drops and counts"

        # 2. A real sidecar, then paused (SIGSTOP) mid-traffic.
        decisions = tmp_path / "decisions.jsonl"
        side = subprocess.Popen([sys.executable, "-m", "monitor.cli", "sidecar", "--config", str(cfg),
                                 "--decisions", str(decisions)], stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "sidecar.log", "wb"))
        try:
            deadline = time.time() + 120
            while ring_counters(rings)["reader_seq"] == 0:  # until the sidecar has read something
                assert time.time() < deadline and side.poll() is None, (tmp_path / "sidecar.log").read_text()
                on.chat([{"role": "user", "content": "ping"}], max_tokens=2)
                time.sleep(0.5)
            os.kill(side.pid, signal.SIGSTOP)
            before = ring_counters(rings)["dropped_slots"]
            assert answers(on) == reference
            assert ring_counters(rings)["dropped_slots"] > before, "a paused sidecar means counted drops"

            # 3. The paused sidecar killed.
            os.kill(side.pid, signal.SIGKILL)
            side.wait(timeout=30)
            assert answers(on) == reference
        finally:
            if side.poll() is None:
                side.kill()

