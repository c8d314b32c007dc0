"""Labelled conversations on disk: one record model, one reader, and the digest that pins a file.

JSON lines: `{"messages": [{"role": ..., "content": ...}, ...], "labels": {"<concept>": 0 or 1}}`, or
`"text"` for a single user message; an optional `"source"` (template or origin) keeps related
records on one side of every split. Every problem is reported as `FILE:LINE: what is wrong`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from monitor.offline import OfflineError


@dataclass
class Record:
    messages: list[dict]
    labels: dict[str, int]
    line: int
    source: str | None = None  # the record's template/origin, if given: kept together in splits


def read_labeled(path: Path, require_labels: bool = True) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise OfflineError(f"{path}: no such file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise OfflineError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(rec, dict):
            raise OfflineError(f"{where}: each line must be a JSON object")
        if "messages" in rec:
            msgs = rec["messages"]
            if not (isinstance(msgs, list) and msgs and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs)):
                raise OfflineError(f"{where}: `messages` must be a non-empty list of {{\"role\": str, \"content\": str}}")
        elif isinstance(rec.get("text"), str):
            msgs = [{"role": "user", "content": rec["text"]}]
        else:
            raise OfflineError(f"{where}: needs `messages` (a chat) or `text` (a string)")
        labels = rec.get("labels", None if require_labels else {})
        if not isinstance(labels, dict) or (require_labels and not labels):
            raise OfflineError(f"{where}: needs `labels`, e.g. {{\"pii\": 1}}")
        for concept, v in labels.items():
            if v not in (0, 1) or isinstance(v, bool):
                raise OfflineError(f"{where}: labels.{concept} must be 0 or 1, got {v!r}")
        source = rec.get("source")
        out.append(Record(msgs, {k: int(v) for k, v in labels.items()}, n, source if isinstance(source, str) else None))
    if not out:
        raise OfflineError(f"{path}: no records")
    return out


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
