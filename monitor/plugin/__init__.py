"""The vLLM plugin: `vllm.general_plugins` entry point `misalignment_monitor = monitor.plugin:register`.

vLLM calls `register()` in every process it starts (API server, engine core, workers), possibly
more than once: it must be idempotent and cheap. It does nothing unless
`MISALIGNMENT_MONITOR_CONFIG` names a config with taps, and nothing at all when
`MISALIGNMENT_MONITOR_DISABLE=1` (the kill switch: vLLM then runs exactly as without the plugin).
With taps it:

  - salts `VllmConfig.compute_hash` with the plugin version and tap layout, so a graph compiled
    without the tap is never reused with it, or the reverse (the AOT compile cache is keyed on the
    config, not on plugin code);
  - wraps `Worker.load_model` (inherited by the CPU worker) to install the tap before the first
    compile, and `Worker.execute_model` to hand each step's rows to the sidecar.

Any failure is logged once and the plugin stands aside; it never stops vLLM from serving.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os

log = logging.getLogger("monitor.plugin")

CONFIG_ENV = "MISALIGNMENT_MONITOR_CONFIG"
DISABLE_ENV = "MISALIGNMENT_MONITOR_DISABLE"
_state: dict = {"registered": False, "config": None}


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _load_config():
    from pathlib import Path

    from monitor.config.load import read_yaml
    from monitor.config.models import MonitorConfig

    path = os.environ.get(CONFIG_ENV)
    if not path:
        return None
    # Schema only: the plugin needs the taps and the transport, not the SAEs or probes.
    return MonitorConfig.model_validate(read_yaml(Path(path)) or {})


def tap_salt(cfg) -> str:
    from monitor import __version__

    layout = {"plugin": __version__, "taps": [t.model_dump() for t in cfg.taps], "op": "tap_residual/1"}
    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]


def register() -> None:
    if _state["registered"]:
        return
    _state["registered"] = True
    if _disabled():
        return
    try:
        cfg = _load_config()
    except Exception as e:  # noqa: BLE001 - a bad config must not take vLLM down
        log.error("misalignment-monitor: cannot read %s (%s); the plugin is off", os.environ.get(CONFIG_ENV), e)
        return
    if cfg is None or not cfg.taps:
        return
    _state["config"] = cfg
    try:
        _install(cfg)
    except Exception:  # noqa: BLE001
        log.exception("misalignment-monitor: installing the plugin failed; vLLM runs without it")


def _install(cfg) -> None:
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu_worker import Worker

    salt = tap_salt(cfg)
    original_hash = VllmConfig.compute_hash

    @functools.wraps(original_hash)
    def compute_hash(self, *args, **kwargs):
        base = original_hash(self, *args, **kwargs)
        return hashlib.sha256(f"{base}|misalignment-monitor:{salt}".encode()).hexdigest()[: len(base)]

    VllmConfig.compute_hash = compute_hash

    original_load = Worker.load_model
    original_execute = Worker.execute_model

    @functools.wraps(original_load)
    def load_model(self, *args, **kwargs):
        result = original_load(self, *args, **kwargs)
        try:
            from monitor.plugin.capture import Capture

            self._misalignment_monitor = Capture(cfg, self)
        except Exception:  # noqa: BLE001
            log.exception("misalignment-monitor: installing the tap failed; vLLM runs without it")
            self._misalignment_monitor = None
        return result

    @functools.wraps(original_execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        output = original_execute(self, scheduler_output, *args, **kwargs)
        capture = getattr(self, "_misalignment_monitor", None)
        if capture is not None:
            capture.after_step(self.model_runner, scheduler_output)
        return output

    Worker.load_model = load_model
    Worker.execute_model = execute_model
    log.info("misalignment-monitor plugin active: taps %s (compile-cache salt %s)", cfg.tapped_layers, salt)
