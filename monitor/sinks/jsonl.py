"""Append JSON objects to a file, one per line, each line one write as it is made.

One `write` per line (unbuffered, append mode), so a reader tailing the file meets whole lines and, at worst,
the start of the line being written, which it leaves for its next read (`monitor.offline.traffic`)."""

from __future__ import annotations

from pathlib import Path

from monitor.sinks import strict_json


class JsonLines:
    def __init__(self, path: Path) -> None:
        self.f = Path(path).open("ab", buffering=0)

    def write(self, obj: dict) -> None:
        self.f.write((strict_json.dumps(obj) + "\n").encode())

    def close(self) -> None:
        self.f.close()
