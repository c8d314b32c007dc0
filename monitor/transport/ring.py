"""A single-producer, single-reader ring of fixed slots in shared memory that never blocks the producer.

vLLM's own `shm_broadcast.MessageQueue` blocks the writer until readers catch up; inference must
never wait for the monitor, so this ring drops instead (or overwrites the oldest slot) and counts.

File layout (little-endian), one file per producer, e.g. /dev/shm/misalignment-monitor-<id>.ring:

    header (4096 bytes)
      0   magic "MMRING01"            8   version u32, header_bytes u32
      16  slots u32, d_model u32      24  slot_rows u32, meta_bytes u32
      32  n_layers u32, dtype u32     40  producer pid u32, overflow u32 (0 drop_newest, 1 overwrite)
      48  slot_bytes u64              56  created_ns u64
      64  layers u32[32]
      ---- producer counters, each u64 on its own cache line ----
      256 write_seq (slots published)  320 dropped_slots   384 dropped_rows   448 published_rows
      512 heartbeat_ns (last publish)  576 errors          640 closed (1 when the producer exits cleanly)
      ---- reader fields ----
      1024 read_seq (next slot the reader wants)
    slot i (slot_bytes each), holding sequence s where i = s % slots
      0   state u64: 2s+1 while being written, 2s+2 once complete (a seqlock)
      8   n_rows u32, meta_len u32
      16  step u64
      24  has_token_ids u32
      64  meta (meta_bytes): `monitor.transport.meta.SlotMeta`, versioned binary columns
      ... token ids: slot_rows x int32, the input token of each row (no text: ids only)
      ... rows: n_layers x slot_rows x d_model in `dtype`

The reader copies a slot out and re-reads its state: if it changed, the slot was overwritten while
being read and is counted as lost. x86-64 and ARM64 both keep aligned 8-byte stores atomic; the
producer writes the state last, after the payload.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from monitor.transport.meta import MetaError, SlotMeta

log = logging.getLogger("monitor.ring")

MAGIC = b"MMRING01"
# 2: slot metadata became `SlotMeta` (versioned, segments as arrays). 3: a token id per row. (The metadata
# carries its own version: `META_VERSION`.)
VERSION = 3
HEADER_BYTES = 4096
SLOT_HEADER = 64
MAX_LAYERS = 32
DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}

# Offsets of the u64 counters in the header (one cache line each: producer and reader never share one).
WRITE_SEQ, DROPPED_SLOTS, DROPPED_ROWS, PUBLISHED_ROWS, HEARTBEAT, ERRORS, CLOSED = (256 + 64 * i for i in range(7))
READ_SEQ = 1024


class RingError(RuntimeError):
    pass


@dataclass(frozen=True)
class RingTotals:
    """The producers' counters summed over rings, as a reader reports them (rings retired included)."""

    published_slots: int = 0
    published_rows: int = 0
    dropped_slots: int = 0
    dropped_rows: int = 0
    errors: int = 0
    lost_slots: int = 0  # lapped before the reader got to them (overwrite_oldest)
    corrupt_slots: int = 0  # complete, but their header or metadata could not be read: skipped

    @classmethod
    def of(cls, counters: dict[str, int]) -> "RingTotals":
        return cls(**{f: counters[f] for f in cls.__dataclass_fields__})

    def __add__(self, other: "RingTotals") -> "RingTotals":
        return RingTotals(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))


@dataclass(frozen=True)
class RingSpec:
    slots: int
    slot_rows: int
    d_model: int
    layers: tuple[int, ...]
    dtype: torch.dtype = torch.bfloat16
    meta_bytes: int = 64 * 1024
    overwrite: bool = False

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def rows_bytes(self) -> int:
        return len(self.layers) * self.slot_rows * self.d_model * self.itemsize

    @property
    def ids_bytes(self) -> int:
        return self.slot_rows * 4

    @property
    def slot_bytes(self) -> int:
        raw = SLOT_HEADER + self.meta_bytes + self.ids_bytes + self.rows_bytes
        return (raw + 4095) // 4096 * 4096

    @property
    def file_bytes(self) -> int:
        return HEADER_BYTES + self.slots * self.slot_bytes


def _rows_offset(spec: RingSpec) -> int:
    return SLOT_HEADER + spec.meta_bytes + spec.ids_bytes


def _u64(buf, off: int) -> int:
    return struct.unpack_from("<Q", buf, off)[0]


def _set_u64(buf, off: int, value: int) -> None:
    struct.pack_into("<Q", buf, off, value)


def _reserve(fd: int, path: Path, size: int) -> None:
    """Back every page now. A sparse file on a full tmpfs gets SIGBUS at the first write to an unbacked
    page, which kills the writing process (vLLM's worker) with no Python exception to catch."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        st = os.statvfs(path.parent)
        path.unlink(missing_ok=True)
        raise RingError(f"cannot reserve {size / 2**20:.0f} MiB for the ring in {path.parent} "
                        f"({st.f_bavail * st.f_frsize / 2**20:.0f} MiB free of {st.f_blocks * st.f_frsize / 2**20:.0f}; "
                        f"{e.strerror}): lower transport.slots or transport.slot_rows, or give {path.parent} more room "
                        "(the chart's shm.sizeLimit)") from None


class _Mapped:
    def __init__(self, path: Path, size: int | None, create: bool, mode: int = 0o600) -> None:
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, mode)
        try:
            if create:
                os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
                os.ftruncate(fd, size)
                _reserve(fd, path, size)
            st = os.fstat(fd)
            self.size, self.inode = st.st_size, st.st_ino
            self.mm = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        # A numpy view of the same bytes: torch.from_numpy gives tensor views for the row areas.
        self.np = np.frombuffer(self.mm, dtype=np.uint8)

    def ids_view(self, offset: int, spec: RingSpec) -> np.ndarray:
        return self.np[offset : offset + spec.ids_bytes].view(np.int32)

    def rows_view(self, offset: int, spec: RingSpec) -> torch.Tensor:
        raw = torch.from_numpy(self.np[offset : offset + spec.rows_bytes])
        return raw.view(spec.dtype).view(len(spec.layers), spec.slot_rows, spec.d_model)

    def close(self) -> None:
        del self.np
        try:
            self.mm.close()
        except BufferError:
            # A lent row is still referenced (a caller's slot, a logged traceback's frame): the mapping is
            # unmapped when the last view of it goes, not now.
            pass


def _header_counters(b) -> dict[str, int]:
    """What the producer counts in the shared header (both sides report it)."""
    return {"published_slots": _u64(b, WRITE_SEQ), "dropped_slots": _u64(b, DROPPED_SLOTS),
            "dropped_rows": _u64(b, DROPPED_ROWS), "published_rows": _u64(b, PUBLISHED_ROWS),
            "errors": _u64(b, ERRORS), "reader_seq": _u64(b, READ_SEQ)}


class RingWriter:
    """The producer side, inside the vLLM worker. `publish` never waits."""

    def __init__(self, path: str | Path, spec: RingSpec, mode: int = 0o600) -> None:
        """`mode`: the file's permissions (0600: one uid reads it; 0660: a shared group). Raises RingError
        when the ring's memory cannot be reserved (the tap then stays off)."""
        if len(spec.layers) > MAX_LAYERS:
            raise RingError(f"at most {MAX_LAYERS} tapped layers per ring")
        self.path = Path(path)
        self.spec = spec
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        m = _Mapped(tmp, spec.file_bytes, create=True, mode=mode)
        buf = m.mm
        buf[0:8] = MAGIC
        struct.pack_into("<II", buf, 8, VERSION, HEADER_BYTES)
        struct.pack_into("<II", buf, 16, spec.slots, spec.d_model)
        struct.pack_into("<II", buf, 24, spec.slot_rows, spec.meta_bytes)
        struct.pack_into("<II", buf, 32, len(spec.layers), DTYPE_CODES[spec.dtype])
        struct.pack_into("<II", buf, 40, os.getpid(), 1 if spec.overwrite else 0)
        struct.pack_into("<QQ", buf, 48, spec.slot_bytes, time.time_ns())
        struct.pack_into(f"<{len(spec.layers)}I", buf, 64, *spec.layers)
        # Appear under the final name only when complete, so a reader never sees half a header.
        os.replace(tmp, self.path)
        m.path = self.path
        self._m = m
        self._slot_rows = [m.rows_view(self._slot_offset(i) + _rows_offset(spec), spec) for i in range(spec.slots)]
        self._slot_ids = [m.ids_view(self._slot_offset(i) + SLOT_HEADER + spec.meta_bytes, spec) for i in range(spec.slots)]
        self.write_seq = 0
        self.closed = False

    def _slot_offset(self, i: int) -> int:
        return HEADER_BYTES + i * self.spec.slot_bytes

    def counters(self) -> dict[str, int]:
        return _header_counters(self._m.mm)

    def has_room(self) -> bool:
        if self.spec.overwrite:
            return True
        return self.write_seq - _u64(self._m.mm, READ_SEQ) < self.spec.slots

    def drop(self, n_rows: int) -> None:
        if self.closed:
            return
        b = self._m.mm
        _set_u64(b, DROPPED_SLOTS, _u64(b, DROPPED_SLOTS) + 1)
        _set_u64(b, DROPPED_ROWS, _u64(b, DROPPED_ROWS) + n_rows)

    def count_error(self) -> None:
        if self.closed:
            return
        b = self._m.mm
        _set_u64(b, ERRORS, _u64(b, ERRORS) + 1)

    def publish(self, step: int, meta: SlotMeta, rows: Sequence[torch.Tensor] | None,
                token_ids: np.ndarray | None = None, payload: bytes | None = None) -> bool:
        """Write one slot: `rows[i]` is layer i's [n, d_model] tensor (CPU), or None for metadata only;
        `token_ids[j]` is row j's input token id, when the producer knows it.

        Returns False (and counts a drop) when the ring is full under drop_newest.
        """
        if self.closed:
            return False
        n = 0 if rows is None else rows[0].shape[0]
        if n > self.spec.slot_rows:
            raise RingError(f"{n} rows exceed the slot size {self.spec.slot_rows}; split the step")
        if not self.has_room():
            self.drop(n)
            return False
        payload = meta.to_bytes() if payload is None else payload  # `payload`: the caller encoded it already
        if len(payload) > self.spec.meta_bytes:
            self.drop(n)
            self.count_error()
            return False
        s = self.write_seq
        i = s % self.spec.slots
        off = self._slot_offset(i)
        b = self._m.mm
        _set_u64(b, off, 2 * s + 1)  # writing
        has_ids = token_ids is not None and n > 0
        struct.pack_into("<IIQI", b, off + 8, n, len(payload), step, int(has_ids))
        b[off + SLOT_HEADER : off + SLOT_HEADER + len(payload)] = payload
        if has_ids:
            self._slot_ids[i][:n] = token_ids[:n]
        if rows is not None and n:
            dst = self._slot_rows[i]
            for li, r in enumerate(rows):
                dst[li, :n].copy_(r)
        _set_u64(b, off, 2 * s + 2)  # complete
        self.write_seq = s + 1
        _set_u64(b, WRITE_SEQ, s + 1)
        _set_u64(b, PUBLISHED_ROWS, _u64(b, PUBLISHED_ROWS) + n)
        _set_u64(b, HEARTBEAT, time.time_ns())
        return True

    def close(self, unlink: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        _set_u64(self._m.mm, CLOSED, 1)
        self._slot_rows = []
        self._slot_ids = []
        self._m.close()
        if unlink:
            self.path.unlink(missing_ok=True)


def _read_header(m: _Mapped, path) -> tuple[RingSpec, int]:
    """The ring's geometry, checked against the file: a damaged or foreign header is a RingError, never a crash."""
    b = m.mm
    if m.size < HEADER_BYTES:
        raise RingError(f"{path}: {m.size} bytes is too small for a ring header ({HEADER_BYTES}): truncated")
    if bytes(b[0:8]) != MAGIC:
        raise RingError(f"{path} is not a monitor ring")
    version, header = struct.unpack_from("<II", b, 8)
    if version != VERSION or header != HEADER_BYTES:
        raise RingError(f"{path}: ring version {version} is not supported (want {VERSION}): run the vLLM plugin and "
                        "the sidecar from the same release")
    slots, d_model = struct.unpack_from("<II", b, 16)
    slot_rows, meta_bytes = struct.unpack_from("<II", b, 24)
    n_layers, dtype_code = struct.unpack_from("<II", b, 32)
    pid, overwrite = struct.unpack_from("<II", b, 40)
    if dtype_code not in DTYPES:
        raise RingError(f"{path}: unknown row dtype code {dtype_code} (known: {sorted(DTYPES)})")
    if not (0 < n_layers <= MAX_LAYERS) or not slots or not slot_rows or not d_model:
        raise RingError(f"{path}: impossible geometry (slots {slots}, rows {slot_rows}, d_model {d_model}, "
                        f"layers {n_layers})")
    layers = struct.unpack_from(f"<{n_layers}I", b, 64)
    spec = RingSpec(slots, slot_rows, d_model, tuple(layers), DTYPES[dtype_code], meta_bytes, bool(overwrite))
    if _u64(b, 48) != spec.slot_bytes:
        raise RingError(f"{path}: slot size in the header does not match its geometry")
    if m.size < spec.file_bytes:
        raise RingError(f"{path}: {m.size} bytes, its header describes {spec.file_bytes}: truncated")
    return spec, pid


def peek_write_seq(path: str | Path) -> int | None:
    """How many slots a ring file has published, without mapping it (None: no such ring)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        raw = os.pread(fd, 8, WRITE_SEQ)
    finally:
        os.close(fd)
    return struct.unpack("<Q", raw)[0] if len(raw) == 8 else None


@dataclass
class Slot:
    seq: int
    step: int
    meta: SlotMeta
    rows: list[torch.Tensor] = field(default_factory=list)  # per layer [n, d_model], copied out of the ring
    token_ids: np.ndarray | None = None  # [n] int32, each row's input token; None when the producer sent none


class RingReader:
    """The sidecar side. Attaches to an existing ring; a restarted reader resumes at the newest slot."""

    def __init__(self, path: str | Path, pin_memory: bool = False) -> None:
        """`pin_memory` (needs CUDA): the ring's memory is registered with the driver (page-locked), so rows
        lent by `poll(reuse=True)` go to the GPU by DMA straight from shared memory, asynchronously: one copy
        per slot. Where registration fails, `poll` copies into page-locked buffers instead."""
        self.path = Path(path)
        self.pin_memory = pin_memory
        m = _Mapped(self.path, None, create=False)
        try:
            self.spec, self.producer_pid = _read_header(m, path)
        except RingError:
            m.close()
            raise
        b = m.mm
        self._m = m
        self._rows = [m.rows_view(HEADER_BYTES + i * self.spec.slot_bytes + _rows_offset(self.spec), self.spec)
                      for i in range(self.spec.slots)]
        self._ids = [m.ids_view(HEADER_BYTES + i * self.spec.slot_bytes + SLOT_HEADER + self.spec.meta_bytes, self.spec)
                     for i in range(self.spec.slots)]
        # Resume where the producer is now: slots written while no reader was attached are counted, not replayed.
        self.next_seq = max(_u64(b, READ_SEQ), _u64(b, WRITE_SEQ) - self.spec.slots)
        self.lost_slots = 0
        self.corrupt_slots = 0  # complete slots whose header or metadata could not be read: skipped
        self.inode = m.inode  # a file replaced under the same name (a restarted producer) has another
        self.created_ns = _u64(b, 56)
        self._buffers: list[torch.Tensor] = []  # `poll(reuse=True)`'s copies, where it cannot lend
        # Under drop_newest the producer never writes a slot the reader has not released (READ_SEQ), so
        # `poll(reuse=True)` can lend the slots' rows in place until the next poll. Under overwrite_oldest it
        # may, so rows are copied out and checked against the slot's state.
        self.lends = not self.spec.overwrite
        self.registered = pin_memory and self.lends and _register_cuda(m)

    def counters(self) -> dict[str, int]:
        b = self._m.mm
        return {**_header_counters(b), "heartbeat_ns": _u64(b, HEARTBEAT), "closed": _u64(b, CLOSED),
                "lost_slots": self.lost_slots, "corrupt_slots": self.corrupt_slots,
                "lag_slots": _u64(b, WRITE_SEQ) - self.next_seq}

    @property
    def closed(self) -> bool:
        return _u64(self._m.mm, CLOSED) == 1

    def poll(self, max_slots: int = 64, reuse: bool = False) -> list[Slot]:
        """Every complete slot since the last poll (up to max_slots), copied out of shared memory.

        With `reuse`, rows are valid only until the next poll (or until `release` gives their slot back):
        under drop_newest they are the ring's own memory, lent (the producer cannot write those slots
        until they are released: one copy fewer per slot); under overwrite_oldest they are copies in
        buffers the reader keeps (fresh allocations page-fault at ~1 GB/s, so reused buffers save as much
        as the copy costs). At most half the ring is lent at once, so a slow reader never leaves a
        producer without room (a full ring drops steps)."""
        b = self._m.mm
        out: list[Slot] = []
        lend = reuse and self.lends
        if lend:
            max_slots = min(max_slots, max(1, self.spec.slots // 2))
        _set_u64(b, READ_SEQ, self.next_seq)  # what the last poll lent is given back
        written = _u64(b, WRITE_SEQ)
        if written - self.next_seq > self.spec.slots:  # lapped while we were away (overwrite mode)
            skipped = written - self.spec.slots - self.next_seq
            self.lost_slots += skipped
            self.next_seq += skipped
        while self.next_seq < written and len(out) < max_slots:
            s = self.next_seq
            i = s % self.spec.slots
            off = HEADER_BYTES + i * self.spec.slot_bytes
            state = _u64(b, off)
            if state != 2 * s + 2:
                if state > 2 * s + 2:  # already overwritten by a later sequence
                    self.lost_slots += 1
                    self.next_seq += 1
                    continue
                break  # being written right now
            n, meta_len, step, has_ids = struct.unpack_from("<IIQI", b, off + 8)
            if n > self.spec.slot_rows or meta_len > self.spec.meta_bytes:
                self._corrupt(s, f"{n} rows / {meta_len} metadata bytes exceed the slot")
                continue
            meta_raw = bytes(b[off + SLOT_HEADER : off + SLOT_HEADER + meta_len])
            if not n:
                rows = []
            elif lend:
                rows = [self._rows[i][li, :n] for li in range(len(self.spec.layers))]
            elif reuse:
                buf = self._staging(len(out))
                rows = [buf[li, :n] for li in range(len(self.spec.layers))]
                for li, r in enumerate(rows):
                    r.copy_(self._rows[i][li, :n])
            else:
                rows = [self._rows[i][li, :n].clone() for li in range(len(self.spec.layers))]
            ids = self._ids[i][:n].copy() if has_ids else None
            if _u64(b, off) != state:  # overwritten while we copied
                self.lost_slots += 1
                self.next_seq += 1
                continue
            try:
                meta = SlotMeta.from_bytes(meta_raw)
                meta.check_rows(n)  # before anything moves: a lying segment skips its slot, nothing else
            except MetaError as e:
                self._corrupt(s, str(e))
                continue
            out.append(Slot(s, step, meta, rows, ids))
            self.next_seq += 1
        if not lend:
            _set_u64(b, READ_SEQ, self.next_seq)
        return out

    def release(self, seq: int) -> None:
        """Give back every lent slot up to and including `seq`: the reader is done with its rows. The
        producer may write there at once, instead of waiting for the next poll."""
        if self.lends and seq < self.next_seq:
            b = self._m.mm
            if seq + 1 > _u64(b, READ_SEQ):
                _set_u64(b, READ_SEQ, seq + 1)

    def _corrupt(self, seq: int, why: str) -> None:
        """Skip a slot that cannot be read; the rest of the ring is read as usual."""
        if self.corrupt_slots < 10 or self.corrupt_slots % 1000 == 0:  # a flood of them must not flood the log
            log.error("ring %s: slot %d skipped: %s", self.path, seq, why,
                      extra={"ring": str(self.path), "seq": seq, "error": why, "corrupt_slots": self.corrupt_slots + 1})
        self.corrupt_slots += 1
        self.next_seq += 1

    def _staging(self, k: int) -> torch.Tensor:
        while len(self._buffers) <= k:
            spec = self.spec
            self._buffers.append(torch.empty((len(spec.layers), spec.slot_rows, spec.d_model), dtype=spec.dtype,
                                             pin_memory=self.pin_memory))
        return self._buffers[k]

    def close(self) -> None:
        self._rows = []
        self._ids = []
        self._buffers = []
        if self.registered:
            _unregister_cuda(self._m)
            self.registered = False
        self._m.close()


def _register_cuda(m: _Mapped) -> bool:
    """Page-lock the ring's mapping for DMA (cudaHostRegister); False where the driver refuses (the reader then
    copies into pinned buffers). The producer's pages are the same ones: pinning them costs it nothing.
    Seen on an H200: a ring in /dev/shm (tmpfs, the default) is accepted; one in a disk-backed folder is
    refused with "invalid argument"."""
    try:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(m.np.ctypes.data, m.size, 0)
    except Exception as e:  # noqa: BLE001 - no CUDA, or a build without the runtime bindings
        log.warning("cannot page-lock ring %s (%s): rows are staged through pinned buffers", m.path, e)
        return False
    if int(err) != 0:
        _clear_cuda_error()
        log.warning("the CUDA driver refused to page-lock ring %s (%s): rows are staged through pinned buffers; "
                    "a ring in /dev/shm can be", m.path, cudart.cudaGetErrorString(err))
        return False
    return True


def _clear_cuda_error() -> None:
    """A refused cudaHostRegister leaves its error as the runtime's last error, which torch's next kernel
    launch would report as its own failure. torch binds no cudaGetLastError; a launch checked by torch
    reads (and so clears) it: done here, where the error is expected."""
    try:
        torch.zeros(1, device="cuda")
    except RuntimeError:
        pass


def _unregister_cuda(m: _Mapped) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(m.np.ctypes.data)
    except Exception:  # noqa: BLE001 - closing must not fail over this
        log.exception("cudaHostUnregister failed for ring %s", m.path)
