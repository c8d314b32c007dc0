"""Starting and stopping the local components the demo and tests run, each in its own process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable


class StartError(RuntimeError):
    """A component exited while starting, or was not ready in time; it has been stopped."""


def stop_process_group(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM the group, then SIGKILL it if it has not exited within `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def http_ok(url: str, timeout: float = 1.0) -> Callable[[], bool]:
    """A readiness check: `url` answers 200."""
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False
    return check


def tcp_open(port: int) -> Callable[[], bool]:
    """A readiness check: something accepts connections on 127.0.0.1:`port`."""
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False
    return check


def wait_ready(proc: subprocess.Popen, ready: Callable[[], bool], what: str, log: Path | None, timeout: float,
               interval: float = 0.2) -> None:
    """Until `ready()`; if the process exits first or time runs out, stop its group and raise StartError."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            reason = f"{what} exited with {proc.returncode} while starting"
            break
        if ready():
            return
        if time.time() > deadline:
            reason = f"{what} was not ready after {timeout:.0f} s"
            break
        time.sleep(interval)
    stop_process_group(proc, timeout=10)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise StartError(f"{reason}; log {log}:\n{tail}" if log is not None else reason)
