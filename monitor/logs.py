"""Structured logs: one JSON object per line (python-json-logger), fields as fields.

Tracebacks and multi-line messages stay inside their JSON string, so every line a log shipper
reads is valid JSON. `extra={...}` on a log call becomes top-level fields. `text` is for a person
at a terminal.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["json", "text"]


def configure(level: int = logging.INFO, fmt: LogFormat = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter("{asctime}{levelname}{name}{message}", style="{",
                                           rename_fields={"asctime": "time", "levelname": "level", "name": "logger",
                                                          "message": "msg"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kafka-python logs every connection at INFO; its warnings (a broker down) are what an operator needs.
    logging.getLogger("kafka").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
