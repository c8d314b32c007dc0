"""`monitor console` as its own process (as in production), for the demo and the browser tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from monitor.stack.process import http_ok, stop_process_group, wait_ready


class ConsoleProcess:
    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.config, self.port, self.log_path = config, port, log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "ConsoleProcess":
        argv = [sys.executable, "-m", "monitor.cli", "console", "--config", str(self.config), "--port", str(self.port)]
        self.proc = subprocess.Popen(argv, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_ready(self.proc, http_ok(f"{self.url}/healthz"), "the console", self.log_path, timeout, interval=0.3)
        return self

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=15)

    def __enter__(self) -> "ConsoleProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
