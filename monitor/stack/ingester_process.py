"""`monitor incidents ingest` as its own process (as in production), for the demo."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from monitor.stack.process import StartError, stop_process_group


class IngesterProcess:
    def __init__(self, config: Path, log_path: Path) -> None:
        self.config, self.log_path = config, log_path
        self.proc: subprocess.Popen | None = None

    def start(self, settle: float = 3.0) -> "IngesterProcess":
        argv = [sys.executable, "-m", "monitor.cli", "incidents", "ingest", "--config", str(self.config)]
        self.proc = subprocess.Popen(argv, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        time.sleep(settle)  # it has no endpoint to ask: a bad config or database makes it exit at once
        if self.proc.poll() is not None:
            raise StartError(f"the incident ingester exited with {self.proc.returncode}; log {self.log_path}:\n"
                             + self.log_path.read_text(errors="replace")[-3000:])
        return self

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=15)

    def __enter__(self) -> "IngesterProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
