"""Labelled conversations on disk: one record model, one reader, and the digest that pins a file.

JSON lines: `{"messages": [{"role": ..., "content": ...}, ...], "labels": {"<concept>": 0 or 1}}`, or
`"text"` for a single user message; an optional `"source"` (template or origin) keeps related
records on one side of every split and names the negatives' families in `monitor eval`; an optional
`"family"` names the distribution a record stands for (default: the file's name). Every problem is
reported as `FILE:LINE: what is wrong`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.offline import OfflineError


@dataclass
class Record:
    messages: list[dict]
    labels: dict[str, int]
    line: int
    source: str | None = None  # the record's template/origin, if given: kept together in splits
    family: str | None = None  # what it stands for, reported apart by `monitor eval`: its `family`, else its file

    @property
    def source_family(self) -> str:
        """Its source without the variant after '#': what `monitor eval` reports false positives by."""
        return self.source.split("#")[0] if self.source else "(no source)"


def source_groups(records: list[Record]) -> np.ndarray:
    """Each record's template family (`source` up to '#'), kept on one side of every split; else itself."""
    return np.array([r.source_family if r.source else f"line{i}" for i, r in enumerate(records)])


def read_labeled(path: Path, require_labels: bool = True, family: str | None = None) -> list[Record]:
    """`family`: what records without their own `family` stand for (default: the file's name without suffix)."""
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
        source, rec_family = rec.get("source"), rec.get("family")
        for key, v in (("source", source), ("family", rec_family)):
            if v is not None and not isinstance(v, str):
                raise OfflineError(f"{where}: `{key}` must be a string, got {v!r}")
        out.append(Record(msgs, {k: int(v) for k, v in labels.items()}, n, source, rec_family or family or path.stem))
    if not out:
        raise OfflineError(f"{path}: no records")
    return out


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
