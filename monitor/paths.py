"""Where the monitor keeps things it makes on a machine, and where the project's checkout is.

The runtime (plugin, sidecar, sinks) never reads the checkout: everything it needs comes from its
config file. The demo, the local stack and the docs generators do: they use the shipped
`deploy/` files and demo artifacts, so they look for the checkout from the current folder up.
"""

from __future__ import annotations

import os
from pathlib import Path

_MARKER = Path("deploy/local/monitor.yaml")


def cache_dir() -> Path:
    """The monitor's cache root: $MONITOR_CACHE_DIR, else $XDG_CACHE_HOME/misalignment-monitor."""
    explicit = os.environ.get("MONITOR_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "misalignment-monitor"


def project_dir(start: Path | None = None) -> Path:
    """The project's checkout containing the current folder (it has `deploy/local/monitor.yaml`)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / _MARKER).is_file():
            return folder
    raise FileNotFoundError(f"no misalignment-monitor checkout at or above {here} (looked for {_MARKER}): the demo, "
                            "the local stack and the docs generators run from the project's folder")
