"""Append JSON objects to a file, one per line, each line flushed as it is written."""

from __future__ import annotations

from pathlib import Path

from monitor.sinks import strict_json


class JsonLines:
    def __init__(self, path: Path) -> None:
        self.f = Path(path).open("a", buffering=1)

    def write(self, obj: dict) -> None:
        self.f.write(strict_json.dumps(obj) + "\n")

    def close(self) -> None:
        self.f.close()
