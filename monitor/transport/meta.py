"""What a ring slot says about its rows: the contract between the vLLM plugin and every reader.

A slot holds the rows of (part of) one forward step. Its metadata names, for each request in the
step, which rows are its own (`Segment`), which requests finished with this step, and when the
step's forward pass ended. It is written as compact JSON with a format version; a reader given a
version it does not know refuses it with a message naming both versions, so a plugin and a sidecar
from different releases fail loudly instead of misreading each other.

Segments are written as arrays, not objects, and each request id once: a worker's id
(`"{i}_{external}-{8 hex}"`) already holds the response id and the caller's `X-Request-Id`, so
the reader derives them (`parse_request_id`); only a segment whose ids do not follow that shape
carries them explicitly. Ids longer than `MAX_ID_CHARS` are cut, with a hash of the whole id, by
the producer (`wire_id`), in segments and finished lists alike: one caller's 12 kB header cannot
overflow a slot. At ~40 bytes per segment, a slot's 64 KiB holds the segments of >1,500 decoding
requests; a step whose metadata would not fit anyway is split over more slots, never dropped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

META_VERSION = 2  # 2: ids derived from the worker's id, written once per segment
MAX_ID_CHARS = 256
_KEEP_CHARS = 200  # of a cut id: its first 200 characters, "~", 16 hex of its blake2b


class MetaError(ValueError):
    """Slot metadata that cannot be read: corrupt, or written by a different release of the plugin."""


_INTERNAL = re.compile(r"^(?:(?P<sample>\d+)_)?(?P<external>.+)-(?P<suffix>[0-9a-f]{8})$", re.S)
_OPENAI_PREFIXES = ("chatcmpl-", "cmpl-", "resp_", "resp-")


@functools.lru_cache(maxsize=65536)  # a request's id recurs at every step it is in: parsed once
def parse_request_id(internal: str) -> tuple[str, str, int]:
    """(external id, caller-visible request id, sample index) from a worker's request id.

    Ids: a worker sees `"{external}-{8 hex}"`, or `"{i}_{external}-{8 hex}"` for the i-th of n > 1
    samples. The OpenAI server's external id is `chatcmpl-` / `cmpl-` + the `X-Request-Id` header."""
    m = _INTERNAL.match(internal)
    if not m:
        return internal, internal, 0
    external = m["external"]
    request_id = external
    for prefix in _OPENAI_PREFIXES:
        if external.startswith(prefix):
            request_id = external[len(prefix):]
            break
    return external, request_id, int(m["sample"] or 0)


def _cut(text: str) -> str:
    digest = hashlib.blake2b(text.encode(errors="surrogatepass"), digest_size=8).hexdigest()
    return f"{text[:_KEEP_CHARS]}~{digest}"


@functools.lru_cache(maxsize=65536)
def wire_id(internal: str) -> str:
    """A worker's id as written in a slot: itself, or (over `MAX_ID_CHARS`) with its caller-chosen part cut
    to 200 characters plus a hash of the whole, its structure kept so the reader still derives the ids."""
    if len(internal) <= MAX_ID_CHARS:
        return internal
    m = _INTERNAL.match(internal)
    if not m:
        return _cut(internal)
    external = m["external"]
    prefix = next((p for p in _OPENAI_PREFIXES if external.startswith(p)), "")
    sample = f"{m['sample']}_" if m["sample"] is not None else ""
    return f"{sample}{prefix}{_cut(external[len(prefix):])}-{m['suffix']}"


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


WIRE_FIELDS = ("req", "start", "n", "n_prompt", "row")  # then, only when not derivable: external_id, request_id, sample
_N_WIRE = len(WIRE_FIELDS)
_N_FULL = _N_WIRE + 3
_short = operator.attrgetter(*WIRE_FIELDS)
_ids = operator.attrgetter("external_id", "request_id", "sample")


def _wire(s: Segment) -> tuple:
    # attrgetter, not dataclasses.astuple (a recursive deep copy): this runs on vLLM's inference thread.
    if _ids(s) == parse_request_id(s.req):
        return _short(s)
    return _short(s) + _ids(s)


def _segment(row: list) -> Segment:
    req, start, n, n_prompt, at = row[:_N_WIRE]
    external, request_id, sample = row[_N_WIRE:] if len(row) == _N_FULL else parse_request_id(str(req))
    return Segment(str(req), str(external), str(request_id), int(sample), start, n, n_prompt, at)


@dataclass(frozen=True)
class SegmentTable:
    """A slot's segments as columns: what a reader splitting rows among many requests works on.
    The derived ids are computed per segment only when asked for (`ids`): a reader needs them for a
    request it has not seen yet, not at every step."""

    req: list[str]
    start: np.ndarray  # [S] int64, and so on for every numeric field
    n: np.ndarray
    n_prompt: np.ndarray
    row: np.ndarray
    explicit: dict[int, tuple[str, str, int]]  # segments whose ids are written out

    def __len__(self) -> int:
        return len(self.req)

    def ids(self, i: int) -> tuple[str, str, int]:
        """(external id, request id, sample) of segment i."""
        return self.explicit.get(i) or parse_request_id(self.req[i])


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
            self._segments = tuple(_segment(r) for r in self._rows)
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
        rows = self._rows if self._rows is not None else [_wire(s) for s in self._segments]
        if not rows:
            empty = np.zeros(0, dtype=np.int64)
            return SegmentTable([], empty, empty, empty, empty, {})
        try:
            ints = np.array([r[1:_N_WIRE] for r in rows], dtype=np.int64).reshape(len(rows), _N_WIRE - 1).T
            explicit = {i: (str(r[5]), str(r[6]), int(r[7])) for i, r in enumerate(rows) if len(r) == _N_FULL}
        except (TypeError, ValueError) as e:
            raise MetaError(f"slot metadata is malformed: a segment's numbers are not integers ({e})") from e
        return SegmentTable([str(r[0]) for r in rows], *ints, explicit)

    def to_bytes(self) -> bytes:
        doc = {"v": META_VERSION, "segments": [_wire(s) for s in self.segments], "finished": list(self.finished),
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
            if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) in (_N_WIRE, _N_FULL)
                                                     for r in rows):
                raise TypeError(f"each segment must be an array of {WIRE_FIELDS} (+ external_id, request_id, sample)")
            finished = tuple(str(r) for r in doc["finished"])
            t = doc.get("t")
        except (KeyError, TypeError) as e:
            raise MetaError(f"slot metadata is malformed ({e})") from e
        meta = cls((), finished, None if t is None else float(t))
        meta._segments, meta._rows = None, rows
        return meta
