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


@dataclass(frozen=True)
class SlotMeta:
    segments: tuple[Segment, ...] = ()
    finished: tuple[str, ...] = ()  # internal ids of requests that finished (or were aborted) in this step
    t: float | None = None  # wall-clock end of the step's forward pass: detection latency is measured from it

    @property
    def n_rows(self) -> int:
        return sum(s.n for s in self.segments)

    def table(self) -> SegmentTable:
        if not self.segments:
            empty = np.zeros(0, dtype=np.int64)
            return SegmentTable([], [], [], empty, empty, empty, empty, empty)
        req, external, request_id, sample, start, n, n_prompt, row = zip(*map(_as_row, self.segments))
        ints = np.array([sample, start, n, n_prompt, row], dtype=np.int64)
        return SegmentTable(list(req), list(external), list(request_id), *ints)

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
            segments = tuple(Segment(*s) for s in doc["segments"])
            finished = tuple(str(r) for r in doc["finished"])
            t = doc.get("t")
        except (KeyError, TypeError) as e:
            raise MetaError(f"slot metadata is malformed ({e})") from e
        return cls(segments, finished, None if t is None else float(t))
