"""Where the monitor keeps things it makes on a machine (prepared models, activation caches)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """The monitor's cache root: $MONITOR_CACHE_DIR, else $XDG_CACHE_HOME/misalignment-monitor."""
    explicit = os.environ.get("MONITOR_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "misalignment-monitor"
