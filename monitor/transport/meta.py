"""What a ring slot says about its rows: the contract between the vLLM plugin and every reader.

A slot holds the rows of (part of) one forward step. Its metadata names, for each request in the
step, which rows are its own (`Segment`), which requests finished with this step, and when the
step's forward pass ended. It is written as a small binary record with a format version (below); a
reader given a version it does not know refuses it with a message naming both versions, so a plugin
and a sidecar from different releases fail loudly instead of misreading each other.

Segments are written as typed columns (a reader takes them with `np.frombuffer`: no parsing per
segment, which in JSON cost a decode step of 256 requests ~0.2 ms, measured: bench/fleet.py), and
each request id once: a worker's id
(`"{i}_{external}-{8 hex}"`) already holds the response id and the caller's `X-Request-Id`, so
the reader derives them (`parse_request_id`); only a segment whose ids do not follow that shape
carries them explicitly. Ids longer than `MAX_ID_CHARS` are cut, with a hash of the whole id, by
the producer (`wire_id`), in segments and finished lists alike: one caller's 12 kB header cannot
overflow a slot. At ~30 bytes + the id per segment, a slot's 64 KiB holds the segments of >1,000
decoding requests; a step whose metadata would not fit anyway is split over more slots, never dropped.

Version 3, little-endian:

    0   b"SM", version u16        4   segments S u32, finished F u32, explicit E u32
    16  t f64 (NaN: none)
    24  start i64[S], n_prompt i64[S], n i32[S], row i32[S], id length u32[S] (code points)
        finished id length u32[F]
        explicit: segment u32[E], sample i64[E], external id length u32[E], request id length u32[E]
        text: the ids, then the finished ids, then each explicit (external, request) pair, as UTF-8
        (lone surrogates passed through: an id is whatever the engine was given)
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import operator
import re
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

META_VERSION = 3  # 2: ids derived from the worker's id, written once per segment. 3: binary columns
_MAGIC = b"SM"
_HEAD = struct.Struct("<2sHIIId")
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


_ids = operator.attrgetter("external_id", "request_id", "sample")


def _explicit(s: Segment) -> bool:
    """Whether a segment's ids must be written out (they do not follow from its worker's id)."""
    return _ids(s) != parse_request_id(s.req)
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
    """A slot's metadata. Read from a ring, its segments stay as the decoded columns until asked for:
    a reader that splits rows by columns (`table()`) never builds hundreds of `Segment` objects."""

    __slots__ = ("_segments", "_table", "finished", "t")

    def __init__(self, segments: Sequence[Segment] = (), finished: Sequence[str] = (), t: float | None = None) -> None:
        self._segments: tuple[Segment, ...] | None = tuple(segments)
        self._table: SegmentTable | None = None
        self.finished = tuple(finished)  # internal ids of requests that finished (or were aborted) in this step
        self.t = t  # wall-clock end of the step's forward pass: detection latency is measured from it

    @property
    def segments(self) -> tuple[Segment, ...]:
        if self._segments is None:
            tb = self._table
            self._segments = tuple(
                Segment(tb.req[i], *tb.ids(i), int(tb.start[i]), int(tb.n[i]), int(tb.n_prompt[i]), int(tb.row[i]))
                for i in range(len(tb)))
        return self._segments

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SlotMeta):
            return NotImplemented
        return (self.segments, self.finished, self.t) == (other.segments, other.finished, other.t)

    def __repr__(self) -> str:
        return f"SlotMeta(segments={self.segments!r}, finished={self.finished!r}, t={self.t!r})"

    @property
    def n_segments(self) -> int:
        return len(self._table) if self._segments is None else len(self._segments)

    @property
    def n_rows(self) -> int:
        return int(self.table().n.sum())

    def table(self) -> SegmentTable:
        if self._table is None:
            segs = self._segments
            cols = [np.fromiter(map(operator.attrgetter(f), segs), np.int64, len(segs))
                    for f in ("start", "n", "n_prompt", "row")]
            self._table = SegmentTable([s.req for s in segs], *cols,
                                       {i: _ids(s) for i, s in enumerate(segs) if _explicit(s)})
        return self._table

    def check_rows(self, n_rows: int) -> None:
        """The segments tile the slot's `n_rows` rows, in order, from row 0 (as the plugin writes them): a
        segment that claims other rows (a damaged or lying slot) would move its request's position past
        rows it never had, or split rows that are not there."""
        tb = self.table()
        if not len(tb):
            return
        bad = np.flatnonzero((tb.n < 0) | (tb.row < 0) | (tb.start < 0) | (tb.n_prompt < 0) | (tb.row + tb.n > n_rows))
        if len(bad):
            i = int(bad[0])
            raise MetaError(f"segment {i} of {len(tb)} (request {tb.req[i]!r}) claims rows {int(tb.row[i])}.."
                            f"{int(tb.row[i] + tb.n[i])} from position {int(tb.start[i])}, the slot holds {n_rows} rows")
        ends = np.cumsum(tb.n)
        gap = np.flatnonzero(tb.row != ends - tb.n)
        if len(gap) or int(ends[-1]) != n_rows:
            i = int(gap[0]) if len(gap) else len(tb) - 1
            raise MetaError(f"the slot's {len(tb)} segments do not tile its {n_rows} rows in order (segment {i}, "
                            f"request {tb.req[i]!r}, starts at row {int(tb.row[i])})")

    def to_bytes(self) -> bytes:
        tb = self.table()
        S, F, E = len(tb), len(self.finished), len(tb.explicit)
        explicit = sorted(tb.explicit.items())
        pairs = [x for _, (ext, rid, _) in explicit for x in (ext, rid)]
        text = "".join(itertools.chain(tb.req, self.finished, pairs))
        parts = [
            _HEAD.pack(_MAGIC, META_VERSION, S, F, E, math.nan if self.t is None else float(self.t)),
            tb.start.astype("<i8").tobytes(), tb.n_prompt.astype("<i8").tobytes(), tb.n.astype("<i4").tobytes(),
            tb.row.astype("<i4").tobytes(), np.fromiter(map(len, tb.req), "<u4", S).tobytes(),
            np.fromiter(map(len, self.finished), "<u4", F).tobytes(),
            np.array([i for i, _ in explicit], "<u4").tobytes(), np.array([v[2] for _, v in explicit], "<i8").tobytes(),
            np.array([len(v[0]) for _, v in explicit], "<u4").tobytes(),
            np.array([len(v[1]) for _, v in explicit], "<u4").tobytes(),
            text.encode("utf-8", "surrogatepass"),
        ]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "SlotMeta":
        if raw[:1] == b"{":  # a JSON slot: the format of releases before version 3
            try:
                version = json.loads(raw).get("v")
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                raise MetaError(f"slot metadata is neither this release's format nor valid JSON ({e})") from None
            raise MetaError(_version_message(version))
        if len(raw) < _HEAD.size or raw[:2] != _MAGIC:
            raise MetaError(f"slot metadata is malformed: {len(raw)} bytes without the {_MAGIC!r} header")
        _, version, S, F, E, t = _HEAD.unpack_from(raw)
        if version != META_VERSION:
            raise MetaError(_version_message(version))
        off = _HEAD.size
        fixed = S * (8 + 8 + 4 + 4 + 4) + F * 4 + E * (4 + 8 + 4 + 4)
        if off + fixed > len(raw):
            raise MetaError(f"slot metadata is malformed: {S} segments, {F} finished and {E} explicit ids need "
                            f"{off + fixed} bytes, it has {len(raw)}")

        def take(dtype: str, count: int) -> np.ndarray:
            nonlocal off
            a = np.frombuffer(raw, dtype, count, off)
            off += a.nbytes
            return a

        start, n_prompt = take("<i8", S), take("<i8", S)
        n, row = take("<i4", S).astype(np.int64), take("<i4", S).astype(np.int64)
        req_len, fin_len = take("<u4", S), take("<u4", F)
        ex_at, ex_sample, ex_ext, ex_rid = take("<u4", E), take("<i8", E), take("<u4", E), take("<u4", E)
        try:
            text = raw[off:].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as e:
            raise MetaError(f"slot metadata is malformed: its ids are not UTF-8 ({e})") from None
        lengths = np.concatenate([req_len, fin_len, np.stack([ex_ext, ex_rid], 1).ravel()]).astype(np.int64)
        if int(lengths.sum()) != len(text):
            raise MetaError(f"slot metadata is malformed: its ids' lengths add up to {int(lengths.sum())} "
                            f"characters, it holds {len(text)}")
        if E and int(ex_at.max()) >= S:
            raise MetaError(f"slot metadata is malformed: explicit ids for segment {int(ex_at.max())} of {S}")
        ends = list(itertools.accumulate(lengths.tolist()))
        ids = [text[a:b] for a, b in zip([0] + ends[:-1], ends)]
        explicit = {i: (ids[S + F + 2 * k], ids[S + F + 2 * k + 1], sample)
                    for k, (i, sample) in enumerate(zip(ex_at.tolist(), ex_sample.tolist()))}
        meta = cls((), ids[S : S + F], None if math.isnan(t) else t)
        meta._segments = None
        meta._table = SegmentTable(ids[:S], start, n, n_prompt, row, explicit)
        return meta


def _version_message(version) -> str:
    return (f"slot metadata version {version!r} is not understood by this reader (version {META_VERSION}): run the "
            "vLLM plugin and the sidecar from the same release")
