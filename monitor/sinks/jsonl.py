"""Append JSON objects to a file, one per line, each line flushed as it is written."""

from __future__ import annotations

import json
from pathlib import Path


class JsonLines:
    def __init__(self, path: Path) -> None:
        self.f = Path(path).open("a", buffering=1)

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self.f.close()
