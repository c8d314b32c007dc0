"""What a ring slot says about its rows: the contract between the vLLM plugin and every reader.

A slot holds the rows of (part of) one forward step. Its metadata names, for each request in the
step, which rows are its own (`Segment`), which requests finished with this step, and when the
step's forward pass ended. It is written as compact JSON with a format version; a reader given a
version it does not know refuses it with a message naming both versions, so a plugin and a sidecar
from different releases fail loudly instead of misreading each other.

Segments are written as arrays in `SEGMENT_FIELDS` order, not objects: a step of hundreds of
decoding requests stays small, and the field names are written once, here.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

META_VERSION = 1


class MetaError(ValueError):
    """Slot metadata that cannot be read: corrupt, or written by a different release of the plugin."""


@dataclass(frozen=True)
class Segment:
    """One request's consecutive rows within a slot."""

    req: str  # the engine's internal id (unique per sample)
    external_id: str  # what the API returned as the response id
    request_id: str  # the X-Request-Id the caller sent or received
    sample: int  # index among n > 1 samples
    start: int  # absolute token position of the first row
    n: int  # rows in this slot
    n_prompt: int  # prompt length: positions below it are prompt, the rest generated
    row: int  # offset of the first row within the slot


SEGMENT_FIELDS = tuple(f.name for f in fields(Segment))
_N_FIELDS = len(SEGMENT_FIELDS)
# A segment as the array written in the slot; attrgetter, not dataclasses.astuple (a recursive deep
# copy): this runs on vLLM's inference thread for every request of every step.
_as_row = operator.attrgetter(*SEGMENT_FIELDS)


@dataclass(frozen=True)
class SegmentTable:
    """A slot's segments as columns: what a reader splitting rows among many requests works on."""

    req: list[str]
    external_id: list[str]
    request_id: list[str]
    sample: np.ndarray  # [S] int64, and so on for every numeric field of `Segment`
    start: np.ndarray
    n: np.ndarray
    n_prompt: np.ndarray
    row: np.ndarray

    def __len__(self) -> int:
        return len(self.req)


class SlotMeta:
    """A slot's metadata. Read from a ring, its segments stay as the decoded arrays until asked for:
    a reader that splits rows by columns (`table()`) never builds hundreds of `Segment` objects."""

    __slots__ = ("_segments", "_rows", "finished", "t")

    def __init__(self, segments: Sequence[Segment] = (), finished: Sequence[str] = (), t: float | None = None) -> None:
        self._segments: tuple[Segment, ...] | None = tuple(segments)
        self._rows: list[list] | None = None
        self.finished = tuple(finished)  # internal ids of requests that finished (or were aborted) in this step
        self.t = t  # wall-clock end of the step's forward pass: detection latency is measured from it

    @property
    def segments(self) -> tuple[Segment, ...]:
        if self._segments is None:
            self._segments = tuple(Segment(*r) for r in self._rows)
        return self._segments

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SlotMeta):
            return NotImplemented
        return (self.segments, self.finished, self.t) == (other.segments, other.finished, other.t)

    def __repr__(self) -> str:
        return f"SlotMeta(segments={self.segments!r}, finished={self.finished!r}, t={self.t!r})"

    @property
    def n_segments(self) -> int:
        return len(self._rows) if self._segments is None else len(self._segments)

    @property
    def n_rows(self) -> int:
        return sum(s.n for s in self.segments)

    def table(self) -> SegmentTable:
        rows = self._rows if self._rows is not None else [_as_row(s) for s in self._segments]
        if not rows:
            empty = np.zeros(0, dtype=np.int64)
            return SegmentTable([], [], [], empty, empty, empty, empty, empty)
        req, external, request_id, *numbers = zip(*rows)
        try:
            ints = np.array(numbers, dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise MetaError(f"slot metadata is malformed: a segment's numbers are not integers ({e})") from e
        return SegmentTable(list(map(str, req)), list(map(str, external)), list(map(str, request_id)), *ints)

    def to_bytes(self) -> bytes:
        doc = {"v": META_VERSION, "segments": [_as_row(s) for s in self.segments], "finished": list(self.finished),
               "t": self.t}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "SlotMeta":
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MetaError(f"slot metadata is not valid JSON ({e})") from e
        if not isinstance(doc, dict):
            raise MetaError("slot metadata must be a JSON object")
        version = doc.get("v")
        if version != META_VERSION:
            raise MetaError(f"slot metadata version {version!r} is not understood by this reader (version "
                            f"{META_VERSION}): run the vLLM plugin and the sidecar from the same release")
        try:
            rows = doc["segments"]
            if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == _N_FIELDS for r in rows):
                raise TypeError(f"each segment must be an array of {_N_FIELDS} fields {SEGMENT_FIELDS}")
            finished = tuple(str(r) for r in doc["finished"])
            t = doc.get("t")
        except (KeyError, TypeError) as e:
            raise MetaError(f"slot metadata is malformed ({e})") from e
        meta = cls((), finished, None if t is None else float(t))
        meta._segments, meta._rows = None, rows
        return meta
