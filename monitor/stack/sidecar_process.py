"""`monitor sidecar` as its own process (as in production), for the demo, the benchmarks and tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from monitor.stack.process import http_ok, stop_process_group, wait_ready


class SidecarProcess:
    def __init__(self, config: Path, metrics_port: int, log_path: Path, decisions: Path | None = None,
                 incidents: Path | None = None) -> None:
        self.config, self.metrics_port, self.log_path, self.decisions = config, metrics_port, log_path, decisions
        self.incidents = incidents
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self, timeout: float = 120) -> "SidecarProcess":
        argv = [sys.executable, "-m", "monitor.cli", "sidecar", "--config", str(self.config)]
        if self.decisions is not None:
            argv += ["--decisions", str(self.decisions)]
        if self.incidents is not None:
            argv += ["--incidents", str(self.incidents)]
        self.proc = subprocess.Popen(argv, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_ready(self.proc, http_ok(f"{self.url}/readyz"), "the sidecar", self.log_path, timeout, interval=0.5)
        return self

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=15)

    def __enter__(self) -> "SidecarProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
