"""The plugin's registration contract, each case in a fresh interpreter (register() patches vLLM)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from capture_helpers import capture_config

PROBE = textwrap.dedent("""
    import json
    from importlib.metadata import entry_points
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu_worker import Worker
    before = (Worker.load_model, Worker.execute_model, VllmConfig.compute_hash)
    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "misalignment_monitor"]
    register = ep.load()
    register(); register()  # vLLM calls it in every process, sometimes twice
    after = (Worker.load_model, Worker.execute_model, VllmConfig.compute_hash)
    print("RESULT:" + json.dumps({"patched": [a is not b for a, b in zip(before, after)],
                                  "wrapped_twice": getattr(Worker.load_model, "__wrapped__", None) is not None
                                  and getattr(Worker.load_model.__wrapped__, "__wrapped__", None) is not None}))
""")


def run_probe(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISALIGNMENT_MONITOR")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT:")), None)
    assert line, out.stderr[-3000:]
    import json

    return json.loads(line[7:])


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return capture_config(tmp_path_factory.mktemp("plugin"))


def test_installed_entry_point_patches_once_with_taps(cfg):
    r = run_probe({"MISALIGNMENT_MONITOR_CONFIG": str(cfg)})
    assert r["patched"] == [True, True, True] and not r["wrapped_twice"]


def test_kill_switch_leaves_vllm_untouched(cfg):
    r = run_probe({"MISALIGNMENT_MONITOR_CONFIG": str(cfg), "MISALIGNMENT_MONITOR_DISABLE": "1"})
    assert r["patched"] == [False, False, False]


def test_no_config_or_no_taps_does_nothing(cfg, tmp_path):
    assert run_probe({})["patched"] == [False, False, False]
    empty = tmp_path / "empty.yaml"
    empty.write_text("taps: []\n")
    assert run_probe({"MISALIGNMENT_MONITOR_CONFIG": str(empty)})["patched"] == [False, False, False]


def test_bad_config_fails_open(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("taps: [{layer: -3}]\n")
    assert run_probe({"MISALIGNMENT_MONITOR_CONFIG": str(bad)})["patched"] == [False, False, False]


def test_compile_cache_salt_follows_the_tap_layout(tmp_path):
    from monitor.config.models import MonitorConfig
    from monitor.plugin import tap_salt

    one = MonitorConfig.model_validate({"taps": [{"layer": 15}]})
    two = MonitorConfig.model_validate({"taps": [{"layer": 15}, {"layer": 3}]})
    assert tap_salt(one) != tap_salt(two)
    assert tap_salt(one) == tap_salt(MonitorConfig.model_validate({"taps": [{"layer": 15}]}))
