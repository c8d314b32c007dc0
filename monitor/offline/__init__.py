"""Offline tools: rows for conversations without a server, evaluation, calibration, probe training.

Nothing at run time (plugin, transport, scoring, detectors, sinks, sidecar) imports this package.
Training and plotting need the `[offline]` extra (scikit-learn, matplotlib); `require` says so.
"""

from __future__ import annotations

import importlib


class OfflineError(ValueError):
    """Bad input to an offline command: the message names the file, line or option and what is wrong."""


def require(module: str):
    """Import an optional dependency of the offline tools, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise OfflineError(f"{module} is not installed: the offline tools need "
                           f"`pip install 'misalignment-monitor[offline]'`") from e
