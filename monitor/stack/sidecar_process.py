"""`monitor sidecar` as its own process (as in production), for the demo, the benchmarks and tests."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from monitor.stack.process import stop_process_group


class SidecarProcess:
    def __init__(self, config: Path, metrics_port: int, log_path: Path, decisions: Path | None = None) -> None:
        self.config, self.metrics_port, self.log_path, self.decisions = config, metrics_port, log_path, decisions
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self, timeout: float = 120) -> "SidecarProcess":
        argv = [sys.executable, "-m", "monitor.cli", "sidecar", "--config", str(self.config)]
        if self.decisions is not None:
            argv += ["--decisions", str(self.decisions)]
        self.proc = subprocess.Popen(argv, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the sidecar exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if urllib.request.urlopen(f"{self.url}/readyz", timeout=1).status == 200:
                    return self
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the sidecar was not ready in {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.5)

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=15)

    def __enter__(self) -> "SidecarProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
