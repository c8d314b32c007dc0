"""The Debian-packaged tools some tests run (promtool, amtool, prometheus, prometheus-alertmanager, chromium)."""

from __future__ import annotations

import os
import shutil

import pytest


def binary(name: str) -> str:
    """The tool's path. `make test` installs them; in CI a missing one is a failure, elsewhere a skip."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} not found: `make system-deps` installs it (apt-get install prometheus prometheus-alertmanager chromium)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path
