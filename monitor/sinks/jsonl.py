"""Append JSON objects to a file, one per line, each line one write as it is made.

One `write` per line (unbuffered, append mode), so a reader tailing the file meets whole lines and, at worst,
the start of the line being written, which it leaves for its next read (`whole_lines`)."""

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


def whole_lines(path: Path) -> list[str]:
    """The file's complete lines. The last piece is "" when the file ends with a newline; otherwise it is
    the line a writer is making this instant, not yet whole: left for the next read."""
    return Path(path).read_text().split("\n")[:-1]
